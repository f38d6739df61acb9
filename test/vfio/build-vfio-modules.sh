#!/usr/bin/env bash
# Rebuilds the guest kernel's VFIO modules with VFIO device cdevs and iommufd,
# for the VFIO lane (test/vfio/lane.sh calls it; it can also run alone).
#
#   bash test/vfio/build-vfio-modules.sh KV KDIR DIR
#     KV    the guest kernel's release, e.g. 6.12.118+deb12-amd64
#     KDIR  that kernel's unpacked linux-image .deb (its changelog names the
#           Debian version, which the sources and headers must match exactly)
#     DIR   cache: DIR/debs (the .debs below), DIR/KV (the result), DIR/work
#
# Debian's 6.12 kernels have "# CONFIG_IOMMUFD is not set", so VFIO has no
# device cdevs (/dev/vfio/devices/vfioN) and there is no /dev/iommu. This
# builds, out of tree, against Debian's own headers for KV:
#   iommufd.ko      drivers/iommu/iommufd as CONFIG_IOMMUFD=m
#   vfio.ko, vfio_iommu_type1.ko, vfio-pci-core.ko, vfio-pci.ko (and whatever
#                   else Debian's config builds in drivers/vfio) with
#                   CONFIG_IOMMUFD=m and CONFIG_VFIO_DEVICE_CDEV=y; the group
#                   and container paths stay as Debian has them.
# vfio.ko then needs iommufd.ko (its depends= says so): load iommufd first.
# The modules are unsigned, so the guest kernel taints when it loads them.
#
# Downloads with apt-get download (nothing is installed): linux-source-<series>,
# linux-headers-KV, linux-headers-<abi>-common, linux-kbuild-<abi>, all at the
# kernel's exact version, 163 MB. Needs gcc-12 (the compiler Debian built the
# kernel with), make, xz-utils. KVMVFIO_LANE_OFFLINE=1: no apt, only cached .debs.
#
# The result is cached: DIR/KV/.built records the Debian version and this
# script's sha256; when both match, it prints "cached" and does nothing.
# Lines "timing LABEL SECONDS" are for the lane's timings table. Exit 0 when
# DIR/KV holds the modules; on failure the last line says what failed.
set -uo pipefail
export LC_ALL=C

[ $# = 3 ] || { echo "usage: $0 KV KDIR DIR" >&2; exit 2; }
KV=$1 KDIR=$2 DIR=$3
OFFLINE=${KVMVFIO_LANE_OFFLINE:-0}
OUT=$DIR/$KV
WORK=$DIR/work

now_us() { echo "${EPOCHREALTIME/./}"; }
since() { local d=$(($(now_us) - $1)); printf '%d.%01d' $((d / 1000000)) $(((d % 1000000) / 100000)); }
die() { echo "build-vfio-modules: FAILED: $*"; exit 1; }
run() { echo "+ $*"; "$@"; }

case "$KV" in *-amd64) ;; *) die "KV $KV is not an amd64 flavour" ;; esac
ABI=${KV%-amd64}                                  # 6.12.118+deb12
SERIES=$(echo "$KV" | cut -d. -f1,2)              # 6.12
CHANGELOG=$KDIR/usr/share/doc/linux-image-$KV-unsigned/changelog.Debian.gz
[ -f "$CHANGELOG" ] || die "no $CHANGELOG: is $KDIR the unpacked linux-image-$KV-unsigned?"
# First line: "linux-6.12 (6.12.118-1~deb12u1) bookworm-security; urgency=high"
VERSION=$(gzip -dc "$CHANGELOG" | head -n1 | sed -n 's/^[^ ]* (\([^)]*\)).*/\1/p')
[ -n "$VERSION" ] || die "cannot read the Debian version from $CHANGELOG"
STAMP="version=$VERSION script=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

if [ -f "$OUT/.built" ] && [ "$(cat "$OUT/.built")" = "$STAMP" ]; then
  echo "vfio modules for $KV ($VERSION): cached in $OUT"
  exit 0
fi
echo "vfio modules for $KV ($VERSION): building ($([ -f "$OUT/.built" ] && echo "stale: $(cat "$OUT/.built")" || echo "none cached"))"

for c in x86_64-linux-gnu-gcc-12 x86_64-linux-gnu-strip make xz dpkg-deb tar; do
  command -v "$c" > /dev/null || die "$c is not installed (packages gcc-12 make xz-utils)"
done

# ------------------------------------------------------------------ download
t=$(now_us)
PKGS=("linux-source-$SERIES" "linux-headers-$KV" "linux-headers-$ABI-common" "linux-kbuild-$ABI")
mkdir -p "$DIR/debs" || die "mkdir $DIR/debs"
declare -A DEB=()
deb_of() { ls "$DIR/debs/${1}_${VERSION}_"*.deb 2>/dev/null | head -n1; }   # no epochs here, so no %3a
fetched=()
for p in "${PKGS[@]}"; do
  f=$(deb_of "$p")
  if [ -z "$f" ] || ! dpkg-deb --info "$f" > /dev/null 2>&1; then
    [ -n "$f" ] && rm -f "$f"
    [ "$OFFLINE" = 1 ] && die "no $p $VERSION in $DIR/debs and KVMVFIO_LANE_OFFLINE=1"
    fetched+=("$p=$VERSION")
  fi
done
if [ ${#fetched[@]} -gt 0 ]; then
  (cd "$DIR/debs" && run apt-get download -q -o APT::Sandbox::User=root "${fetched[@]}") \
    || die "apt-get download ${fetched[*]} (is $VERSION of each in the apt lists?)"
fi
for p in "${PKGS[@]}"; do
  DEB[$p]=$(deb_of "$p")
  [ -n "${DEB[$p]}" ] || die "apt-get download left no $p in $DIR/debs"
done
echo "downloaded: ${fetched[*]:-nothing (all cached)}; $(du -cm "${DEB[@]}" | tail -n1 | cut -f1) MB of .debs"
echo "timing download $(since "$t")"

# ------------------------------------------------------------------ unpack
t=$(now_us)
rm -rf "$WORK" && mkdir -p "$WORK/root" || die "creating $WORK"
for p in "linux-headers-$KV" "linux-headers-$ABI-common" "linux-kbuild-$ABI"; do
  dpkg-deb -x "${DEB[$p]}" "$WORK/root" || die "dpkg-deb -x ${DEB[$p]}"
done
HDR=$WORK/root/usr/src/linux-headers-$KV
# The flavour's Makefile is one line, "include /usr/src/linux-headers-<abi>-common/Makefile":
# point it at the copy here (its scripts/ and tools/ symlinks are relative, they need nothing).
sed -i "s#^include /usr/src/#include $WORK/root/usr/src/#" "$HDR/Makefile" || die "editing $HDR/Makefile"
grep -q "^include $WORK/root/usr/src/linux-headers-$ABI-common/Makefile\$" "$HDR/Makefile" \
  || die "$HDR/Makefile does not include the -common headers as expected: $(cat "$HDR/Makefile")"

# Only what is built, from the source tarball inside linux-source (xz: ~10 s, most of the unpack).
SRC=linux-source-$SERIES
dpkg-deb --fsys-tarfile "${DEB[$SRC]}" | tar -xO "./usr/src/$SRC.tar.xz" \
  | tar -xJ -C "$WORK" --wildcards "$SRC/drivers/vfio/*" "$SRC/drivers/iommu/*.h" \
      "$SRC/drivers/iommu/iommufd/*" "$SRC/lib/interval_tree.c" \
  || die "extracting drivers/vfio, drivers/iommu and lib/interval_tree.c from ${DEB[$SRC]}"
S=$WORK/$SRC
echo "timing unpack $(since "$t")"

# ------------------------------------------------------------------ build
t=$(now_us)
MAKE=(make -C "$HDR" -j"$(nproc)"
  CONFIG_DEBUG_INFO_BTF_MODULES=     # no BTF for these modules, so no pahole
  CONFIG_IOMMUFD=m CONFIG_VFIO_DEVICE_CDEV=y
  # The command line's CONFIG_ reach the Makefiles, not the C: the C sees autoconf.h, so say it again.
  KCFLAGS="-DCONFIG_IOMMUFD_MODULE=1 -DCONFIG_VFIO_DEVICE_CDEV=1")

# iommufd: the objects its Makefile lists for the module (no selftest), plus
# the interval tree's span iterator when Debian's vmlinux does not export it
# (CONFIG_INTERVAL_TREE_SPAN_ITER is selected only by IOMMUFD, which is off).
IF=$S/drivers/iommu/iommufd
objs=$(awk '/^iommufd-y[ \t]*:=/ {on=1}
  on {l=$0; sub(/^iommufd-y[ \t]*:=/, "", l); more=(l ~ /\\[ \t]*$/); sub(/\\[ \t]*$/, "", l); printf "%s ", l; if (!more) exit}' \
  "$IF/Makefile" | tr -s ' \t' ' ')
case " $objs " in *" main.o "*) ;; *) die "cannot read iommufd-y from $IF/Makefile (got: $objs)" ;; esac
if grep -q -P '\tinterval_tree_span_iter_first\tvmlinux\t' "$HDR/Module.symvers"; then
  echo "vmlinux exports interval_tree_span_iter_*: iommufd uses them"
else
  # The #ifdef CONFIG_INTERVAL_TREE_SPAN_ITER block of lib/interval_tree.c, static
  # helpers and all, without its exports (they stay the module's own).
  {
    echo '/* From lib/interval_tree.c (CONFIG_INTERVAL_TREE_SPAN_ITER), by test/vfio/build-vfio-modules.sh. */'
    echo '#include <linux/interval_tree.h>'
    awk '/^#ifdef CONFIG_INTERVAL_TREE_SPAN_ITER/ {on=1; next} on && /^#endif/ {exit} on && !/^EXPORT_SYMBOL/' \
      "$S/lib/interval_tree.c"
  } > "$IF/span_iter.c"
  n=$(grep -c -E '^void interval_tree_span_iter_(first|next|advance)\(' "$IF/span_iter.c")
  [ "$n" = 3 ] || die "lib/interval_tree.c: expected 3 span iterator functions, found $n"
  objs="$objs span_iter.o"
  echo "vmlinux lacks interval_tree_span_iter_*: compiled into iommufd.ko from lib/interval_tree.c"
fi
printf '# Written by test/vfio/build-vfio-modules.sh\nobj-m := iommufd.o\niommufd-y := %s\n' "$objs" > "$IF/Kbuild"
rm -f "$IF/Makefile"
run "${MAKE[@]}" M="$IF" modules || die "make iommufd (see above)"

# drivers/vfio as Debian's config has it, linked against iommufd's exports.
V=$S/drivers/vfio
run "${MAKE[@]}" M="$V" KBUILD_EXTRA_SYMBOLS="$IF/Module.symvers" modules || die "make drivers/vfio (see above)"
echo "timing build $(since "$t")"

# ------------------------------------------------------------------ check, install
modinfo_of() { tr '\0' '\n' < "$1" | sed -n "s/^$2=//p" | head -n1; }
want_vermagic=$(xz -dc "$KDIR/lib/modules/$KV/kernel/drivers/vfio/vfio.ko.xz" 2>/dev/null | tr '\0' '\n' | sed -n 's/^vermagic=//p' | head -n1)
[ -n "$want_vermagic" ] || die "cannot read the vermagic of Debian's vfio.ko.xz in $KDIR"
mods=("$IF/iommufd.ko" "$V/vfio.ko" "$V/vfio_iommu_type1.ko" "$V/pci/vfio-pci-core.ko" "$V/pci/vfio-pci.ko")
for m in "${mods[@]}"; do
  [ -f "$m" ] || die "the build made no $m"
  [ "$(modinfo_of "$m" vermagic)" = "$want_vermagic" ] \
    || die "$m: vermagic '$(modinfo_of "$m" vermagic)', the kernel's is '$want_vermagic'"
done
[[ ",$(modinfo_of "$V/vfio.ko" depends)," == *,iommufd,* ]] \
  || die "vfio.ko does not depend on iommufd (depends=$(modinfo_of "$V/vfio.ko" depends)): built without CONFIG_IOMMUFD?"
grep -a -q 'vfio/devices/%s' "$V/vfio.ko" || die "vfio.ko has no device cdev (no 'vfio/devices/%s'): built without CONFIG_VFIO_DEVICE_CDEV?"
rm -rf "$OUT" "$OUT.tmp" && mkdir -p "$OUT.tmp" || die "creating $OUT.tmp"
find "$IF" "$V" -name '*.ko' -exec cp {} "$OUT.tmp/" \; || die "copying the modules to $OUT.tmp"
# As Debian ships its own: no debug info (a third of the size; the initramfs is not compressed).
x86_64-linux-gnu-strip --strip-debug "$OUT.tmp"/*.ko || die "strip --strip-debug of the modules"
echo "$STAMP" > "$OUT.tmp/.built" && mv "$OUT.tmp" "$OUT" || die "moving $OUT.tmp to $OUT"
echo "built: $(cd "$OUT" && ls *.ko | tr '\n' ' ')(vermagic $want_vermagic; vfio depends=$(modinfo_of "$V/vfio.ko" depends))"

# Keep one kernel's worth: drop the work tree and what an older kernel left.
rm -rf "$WORK"
for old in "$DIR"/*/; do old=${old%/}; [ "$old" = "$OUT" ] || [ "$old" = "$DIR/debs" ] || rm -rf "$old"; done
for old in "$DIR"/debs/*.deb; do
  keep=; for f in "${DEB[@]}"; do [ "$old" = "$f" ] && keep=1; done
  [ -n "$keep" ] || rm -f "$old"
done
exit 0
