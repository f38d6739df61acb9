/** The kernel boundary. Everything that calls libc or an ioctl lives under src/kernel/. */
export { SysError, errnoName, Errno } from './errors';
export { OwnedFd, type SendableFd } from './fd';
export { Kvm, VmFd, KvmVfioDevice } from './kvm';
export { VfioGroup, VfioContainer, VfioDevice, type VfioGroupStatus } from './vfio';
export { Iommufd, VfioDeviceCdev, type VfioDeviceInfo } from './iommufd';
export { peerCredentials, fdLimits, openFdCount, listOpenFds, presizeFdTable, kernelRelease, probeKvmVfio, type PeerCred, type FdLimits, type KvmVfioSupport } from './host';
export { KVM, KVM_DEV_VFIO, VFIO, IOMMUFD } from './libc';
export { SeqpacketSocket, SeqpacketListener, StreamSocket, bindDatagramSocket, socketKind, watchReadable, peersHungUp, MAX_RECORD, MAX_FDS, type Received, type FdWatch, type SocketKind } from './unix';
export { pidfdOpen, peerPidfd, boottimeNs, pidfdExited, watchProcessExit, unixPeerInode, type PeerPidfd, type PeerProof, pidfdSendSignal, setMemlockLimit, getMemlockLimit, inheritAcrossExec, execReplace, SIGKILL, SIGTERM } from './process';
export { GuestMemory, Vcpu, KvmSregs, KVM_GUEST, KVM_EXIT, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, exitReasonName, setUserMemoryRegion, vcpuMmapSize, type MemoryRegion, type KvmRegs, type KvmSegment, type SegmentName, type IoExit, type VcpuExit } from './guest';
export { Systemd, takeListenFds } from './systemd';
