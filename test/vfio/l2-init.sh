#!/bin/sh
# /init of the L2 guest of the VFIO lane's hot-plug test (busybox sh): the
# Linux that runs inside QEMU 10 inside the lane's guest, so that a hot-plug
# is seen from the guest's own side. test/vfio/lane.sh packs it with busybox
# into an initramfs (cached); test/vfio/hotplug.test.ts reads its serial
# console from the file QEMU writes it to.
#
# Console lines (all start with "kvmvfio-l2: "):
#   init uptime=U            once, when /init runs
#   pci uptime=U DEVS        the PCI devices sysfs lists, each BUS:DEV.FN=VENDOR:DEVICE,
#                            at start, whenever the list changes, and every 20th poll
# It polls /sys/bus/pci/devices every 0.5 s with shell builtins only (no fork
# per poll: under TCG in TCG a fork costs tens of ms).
PATH=/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
read -r up _ < /proc/uptime
echo "kvmvfio-l2: init uptime=$up"
prev=
n=0
while :; do
  cur=
  for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    read -r v < "$d/vendor"
    read -r i < "$d/device"
    cur="$cur ${d##*/0000:}=${v#0x}:${i#0x}"
  done
  n=$((n + 1))
  if [ "$cur" != "$prev" ] || [ "$n" -ge 20 ]; then
    read -r up _ < /proc/uptime
    echo "kvmvfio-l2: pci uptime=$up$cur"
    prev=$cur
    n=0
  fi
  sleep 0.5
done
