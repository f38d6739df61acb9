/** What the host and its kernel offer, learnt once at start (the probe) or read on demand (fds, counts). */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { type Kvm, type KvmVfioSupport, fdLimits, kernelRelease, openFdCount, probeKvmVfio } from '../kernel';

export interface HostFacts {
  kernelRelease: string;
  kvmApiVersion: number;
  support: KvmVfioSupport & { vfioContainer: boolean };
  startTime: string;
  /** Where the device nodes are (/dev; a fake tree in tests). */
  devRoot: string;
}

export interface HostSnapshot extends HostFacts {
  fdLimitSoft: number;
  fdLimitHard: number;
  fdsOpen: number;
  /** /dev/iommu is there now (iommufd; the module may load after the daemon started). */
  iommufd: boolean;
  /** /dev/vfio/devices is there now (VFIO device cdevs). */
  vfioDeviceCdev: boolean;
}

/** Probes the kernel through the daemon's /dev/kvm fd. Resolves once every probe fd is closed. */
export async function learnHost(kvm: Kvm, devRoot: string): Promise<HostFacts> {
  const support = await probeKvmVfio(kvm);
  return {
    kernelRelease: kernelRelease(),
    kvmApiVersion: kvm.apiVersion(),
    support: { ...support, vfioContainer: existsSync(join(devRoot, 'vfio', 'vfio')) },
    startTime: new Date().toISOString(),
    devRoot,
  };
}

export async function snapshot(facts: HostFacts): Promise<HostSnapshot> {
  const lim = fdLimits();
  return {
    ...facts,
    fdLimitSoft: lim.soft,
    fdLimitHard: lim.hard,
    fdsOpen: await openFdCount(),
    iommufd: existsSync(join(facts.devRoot, 'iommu')),
    vfioDeviceCdev: existsSync(join(facts.devRoot, 'vfio', 'devices')),
  };
}
