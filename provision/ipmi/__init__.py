"""IPMI v2.0 over LAN (RMCP+, "lanplus"): an event-driven client.

Many sessions run concurrently in one thread, on one UDP socket, each a state
machine fed by the datagrams of its BMC; that is what lets ``provision node
power status`` answer a thousand BMCs in about a second (bench/bmc_fanout.py).

* ``crypto``    cipher suites 3 and 17, RAKP codes, session keys, AES-CBC-128
* ``wire``      RMCP+ packets and the IPMI messages inside them (bytes only)
* ``session``   one session: handshake, requests, retransmission, Close Session
* ``transport`` sockets, selector and timers shared by many sessions
* ``runner``    many operations at once: fan-out bound, deadlines, retries
* ``client``    one session kept open for several operations (``provision.bmc.IpmiClient``)
* ``errors``    BmcAuthError, BmcUnreachableError and their hints

What the BMC is asked to do (power, boot device) is provision.bmc's business:
an operation is a generator of ``session.Request`` objects.
"""
