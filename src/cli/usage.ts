/**
 * kvmvfioctl's help: the full text for --help, one synopsis per command for
 * usage errors. The same text renders the manual page kvmvfioctl(1)
 * (src/man/) and the shell completion (completion.ts), so keep its shape:
 * the rules are in src/man/help.ts, and the build fails on a line that breaks them.
 */
import { DEFAULT_HANDOFF } from './attach';

/** Every command, by its command words. The completion and the manual page are built from this table. */
export const SYNOPSIS: Record<string, string> = {
  info: 'kvmvfioctl info',
  metrics: 'kvmvfioctl metrics',
  health: 'kvmvfioctl health [SERVICE]',
  groups: 'kvmvfioctl groups [GROUP]',
  'vm create': 'kvmvfioctl vm create NAME --vmm-uid UID [--vfio-device] [--group N]... [--cdev] [--label KEY=VALUE]... [--memlock SIZE] [--request-id ID]',
  'vm get': 'kvmvfioctl vm get VM',
  'vm token': 'kvmvfioctl vm token VM',
  'vm args': 'kvmvfioctl vm args VM --vmm qemu [--hotplug-ports N]',
  'vm list': 'kvmvfioctl vm list [--label KEY=VALUE]... [--state pending|running|exited|failed]... [--page-size N]',
  'vm delete': 'kvmvfioctl vm delete VM [--force]',
  'vm watch': 'kvmvfioctl vm watch [--label KEY=VALUE]... [--state pending|running|exited|failed]...',
  'vm vfio-device': 'kvmvfioctl vm vfio-device VM',
  'vm add-group': 'kvmvfioctl vm add-group VM GROUP',
  'vm remove-group': 'kvmvfioctl vm remove-group VM GROUP',
  attach: 'kvmvfioctl attach [--token TOKEN] [--handoff PATH] -- CMD [ARG]...',
  'policy check': 'kvmvfioctl policy check FILE',
  conformance: 'kvmvfioctl conformance [--only SCENARIO]... -- VMM [ARG]...',
  completion: 'kvmvfioctl completion bash',
};

/** The global flags, as a synopsis: they go anywhere on the line. */
export const GLOBAL_SYNOPSIS = '[--socket PATH] [--json] [--timeout MS]';

const VM_COMMANDS = Object.keys(SYNOPSIS).filter((k) => k.startsWith('vm '));

/** The full help. A function: it loads the client for its default socket, which attach must not load (see main.ts). */
export const help = (): string => `Usage: kvmvfioctl ${GLOBAL_SYNOPSIS} COMMAND [ARGS]

Command-line client of kvmvfiod, the broker of /dev/kvm and VFIO groups.

Commands call the kvmvfio.v1 API on the daemon's socket (health: grpc.health.v1);
attach speaks the handoff session as a VMM's side, conformance as the daemon's;
policy check and completion work offline.

Commands:
  info                        what the host and its kernel can do, and what the daemon holds
  metrics                     the daemon's Prometheus metrics (text format), over the API socket
  health [SERVICE]            grpc.health.v1 Check of the daemon (or of SERVICE, e.g. kvmvfio.v1.KvmVfio):
                              prints SERVING, NOT_SERVING...; exit 0 only when SERVING (a container
                              HEALTHCHECK or liveness probe)
  groups [GROUP]              the host's IOMMU groups (devices, drivers, viability, holder), or one
  policy check FILE           validate a policy file offline (exit 0 valid, 1 not, with where and what)
                              and print each principal's limits with the defaults applied
  vm create NAME --vmm-uid UID [--vfio-device] [--group N]... [--cdev] [--label KEY=VALUE]...
            [--memlock SIZE] [--request-id ID]
                              record a VM (PENDING) and claim its groups, and print its attach token;
                              --group needs --vfio-device; --cdev hands its VMM each device's cdev and
                              an iommufd instead of the group files (what QEMU takes)
  vm get VM                   one VM
  vm token VM                 a new attach token for a PENDING VM (earlier ones stop working)
  vm args VM --vmm qemu [--hotplug-ports N]
                              the VMM arguments that use the fds kvmvfioctl attach hands over, with
                              its placeholders, e.g. for QEMU -add-fd fd={kvm},set=1,... -accel kvm,...;
                              for a --cdev VM also its iommufd, devices, the daemon's monitor ({qmp},
                              for AddGroup/RemoveGroup by hot-plug) and N spare PCIe root ports
                              (default 4; QEMU's machine must be q35)
  vm list [--label KEY=VALUE]... [--state STATE]... [--page-size N]
                              the VMs, oldest first; every label must match, any state may;
                              all of them, fetched N per call (default 100, at most 500)
  vm delete VM [--force]      remove a VM and return its groups (--force kills its VMM)
  vm watch [--label KEY=VALUE]... [--state STATE]...
                              one line per VM event until interrupted (SIGINT/SIGTERM end it, exit 0)
  vm vfio-device VM           give the VM its KVM-VFIO device
  vm add-group VM GROUP       add an IOMMU group to the VM
  vm remove-group VM GROUP    remove an IOMMU group from the VM
  attach [--token TOKEN] [--handoff PATH] -- CMD [ARG]...
                              be the VMM of the VM the token names, for VMMs that do not speak the
                              handoff session (QEMU, cloud-hypervisor): receive /dev/kvm, the VFIO
                              container and the VM's group fds, then exec CMD (searched in PATH) in
                              this process, same pid, with them inherited and listed in $KVMVFIO_FDS,
                              e.g. kvm:17,vfio-container:18,group-12:19,session:20 (vfio-container only
                              when the daemon sent one), and $KVMVFIO_VM_ID, $KVMVFIO_VM_NAME set.
                              In ARGs, {kvm}, {vfio-container}, {group:N}, {iommufd}, {device:ADDRESS}
                              and {session} become those fds' numbers; {qmp}, one end of a socketpair
                              whose other end goes to the daemon (QEMU's monitor for hot-plug), e.g.
                              -add-fd fd={kvm},set=1 -accel kvm,device=/dev/fdset/1
                              (kvmvfioctl vm args VM --vmm qemu prints them); one the daemon did not
                              hand out is INVALID_ARGUMENT, and nothing is exec'd.
                              CMD holds the session; the VM ends when CMD exits, and DeleteVm
                              sends it SIGTERM (with --force, SIGKILL). CMD inherits stdin,
                              stdout, stderr and the fds in $KVMVFIO_FDS, no other fd.
                              The token comes from --token, else $KVMVFIO_TOKEN; prefer the variable:
                              a command line is visible to every user in ps. The handoff socket: --handoff,
                              else $KVMVFIO_HANDOFF, else ${DEFAULT_HANDOFF}.
                              The daemon's VM operations on such a VM fail with FAILED_PRECONDITION,
                              except, with {qmp}, AddGroup/RemoveGroup/CreateVfioDevice of a --cdev VM.
  conformance [--only SCENARIO]... -- VMM [ARG]...
                              check a VMM against the session protocol (docs/session-protocol.md):
                              play the daemon's side on a socket of its own, run VMM once per
                              scenario ({handoff} in ARGs and $KVMVFIO_HANDOFF name the socket,
                              $KVMVFIO_TOKEN holds a token) and print each rule it checks as PASS,
                              FAIL or SKIP; exit 0 when none failed. Needs /dev/kvm. --timeout MS:
                              how long to wait for each thing the VMM should do (default 5000)
  completion bash             print a bash completion script for kvmvfioctl, e.g. in ~/.bashrc:
                              source <(kvmvfioctl completion bash)

Arguments:
  VM          a VM id or name: an argument shaped like an id (a UUID, in any case) is only ever an
              id, anything else only a name; a name that more than one VM you can see has (root and
              admins see every owner's) is an error that lists their ids and owners
  GROUP, N    an IOMMU group number, as in /dev/vfio/N
  STATE       pending, running, exited or failed
  SIZE        bytes, or K, M, G, T (powers of 1024), e.g. 2G
  KEY=VALUE   a label: keys [A-Za-z0-9._/-], 1-63 characters; values at most 253 characters;
              at most 32 labels

Global flags (anywhere on the line):
  --socket PATH   the daemon's API socket (else $KVMVFIO_SOCKET, else ${(require('../client/client') as typeof import('../client/client')).DEFAULT_SOCKET})
  --json          print the response message as JSON (proto field names); errors as
                  {"error":{"code":...,"message":...}} on stderr
  --timeout MS    deadline of each call (default 10000; vm delete 30000, past the daemon's
                  wait for a VMM to exit; vm watch runs until interrupted; for attach, of
                  the daemon's answer)
  -h, --help      this help
  --version       kvmvfioctl's version

Environment:
  KVMVFIO_SOCKET   the API socket, when --socket is not given
  KVMVFIO_TOKEN    attach: the attach token, when --token is not given
  KVMVFIO_HANDOFF  attach: the handoff socket, when --handoff is not given

Exit status:
  0    success
  1    the call failed (the gRPC status and message are printed on stderr), health is not
       SERVING, policy check found the file not valid, or conformance found a rule broken
  2    usage error (the command's synopsis is printed)
  126  attach: CMD was found but could not be run (the errno is printed)
  127  attach: CMD was not found
attach returns only when CMD could not be run, or the daemon refused (1: PERMISSION_DENIED
for a bad, expired or used token); once CMD runs, the exit status is CMD's.
`;

/** The synopsis shown under a usage error: the command's own, or all of vm's, or the top level. */
export function synopsisFor(command: string | undefined): string {
  if (command && Object.hasOwn(SYNOPSIS, command)) return `Usage: ${SYNOPSIS[command]}`;
  if (command === 'vm' || command?.startsWith('vm ')) return `Usage:\n${VM_COMMANDS.map((k) => `  ${SYNOPSIS[k]}`).join('\n')}`;
  return `Usage: kvmvfioctl ${GLOBAL_SYNOPSIS} COMMAND ...\nCommands: ${topLevelWords().join(', ')}`;
}

/** The first words of the commands, in table order: info, metrics, ..., vm, attach, policy, completion. */
export function topLevelWords(): string[] {
  return [...new Set(Object.keys(SYNOPSIS).map((k) => k.split(' ')[0]))];
}
