"""Rolling re-image: move nodes to another image version without draining the cluster.

``plan`` checks a request against the image store, the boot backend, Slurm and
the join service and cuts the nodes into waves (canaries first) — refusing,
with nothing changed, what cannot be done safely. ``runner`` carries the plan
out wave by wave: pin the wave's nodes to the new version on the boot backend,
``scontrol reboot ASAP nextstate=RESUME`` (jobs finish first), follow each
node until it booted the version (its join agent reports the image's
``/etc/provision-release``), rejoined by itself and is back in service, run the
site's check; a node that fails goes back to its previous version through its
BMC and the rollout stops. ``state`` keeps all of it in the state directory, so
an interrupted rollout is resumed where it stood.
"""

from provision.rollout.plan import Plan, RolloutRequest, make_plan
from provision.rollout.runner import Progress, Rollout
from provision.rollout.state import NodePhase, RolloutState, RolloutStore

__all__ = ["NodePhase", "Plan", "Progress", "Rollout", "RolloutRequest", "RolloutState", "RolloutStore", "make_plan"]
