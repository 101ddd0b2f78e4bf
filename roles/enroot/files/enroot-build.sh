#!/bin/sh
# Build and install an Enroot release tarball tree ($1) under /usr, with the
# git submodules a release tarball lacks taken from Debian: musl-tools (its
# musl-gcc, with the static-PIE fix of enroot's deps/musl.patch applied to a
# copy of its specs), linux-libc-dev (the kernel UAPI headers) and makeself.
# libbsd's few files are vendored in the tarball and built by enroot's Makefile.
set -eu
src=$1
cd "$src"
dist=$src/deps/dist
triple=$(gcc -dumpmachine)

mkdir -p "$dist/musl/bin" "$dist/linux/include" "$dist/makeself/bin"
# Debian's wrapper names its specs file: exec gcc "$@" -specs "<file>".
specs=$(sed -n 's/.*-specs "\([^"]*\)".*/\1/p' "$(command -v musl-gcc)")
[ -f "$specs" ] || { echo "enroot-build: musl-gcc's specs file not found (musl-tools)" >&2; exit 1; }
if grep -q static-pie "$specs"; then
  cp "$specs" "$dist/musl/musl-gcc.specs"
else
  sed -e 's|%{!shared: \([^ ]*\)/Scrt1.o}|%{static-pie: \1/rcrt1.o} %{!static-pie: %{!shared: \1/Scrt1.o}}|' \
      -e 's|-dynamic-linker \([^ ]*\) -nostdlib|%{static-pie:-no-dynamic-linker -static -pie} %{!static-pie:-dynamic-linker \1} -nostdlib|' \
      "$specs" > "$dist/musl/musl-gcc.specs"
fi
cat > "$dist/musl/bin/musl-gcc" <<WRAPPER
#!/bin/sh
exec gcc "\$@" -specs "$dist/musl/musl-gcc.specs"
WRAPPER
chmod 755 "$dist/musl/bin/musl-gcc"
for d in linux asm-generic; do ln -sfn "/usr/include/$d" "$dist/linux/include/$d"; done
ln -sfn "/usr/include/$triple/asm" "$dist/linux/include/asm"
install -m 755 /usr/bin/makeself "$dist/makeself/bin/enroot-makeself"
touch deps/musl/.stamp deps/linux-headers/.stamp deps/makeself/.stamp

# No -DALLOW_SPECULATION -DINHERIT_FDS: the hardened flavour (enroot-hardened).
unset CPPFLAGS
make -j"$(nproc)" CC=gcc prefix=/usr sysconfdir=/etc install
make prefix=/usr sysconfdir=/etc setcap
