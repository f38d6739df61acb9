#!/usr/bin/env node
/**
 * kvmvfioctl: the command-line client of kvmvfiod, built on KvmVfioApi.
 * Exit status: 0 success, 1 the call failed, 2 usage error; `health`, 1 also
 * when the daemon answers but is not SERVING; `attach`, which execs its VMM,
 * 127 when the VMM was not found and 126 when it could not run.
 */
import { existsSync } from 'node:fs';
import type { ApiError, KvmVfioApi, Vm } from '../client/client';
import { DAEMON_VERSION } from '../version';
import {
  type CommandLine,
  type OptionName,
  PAGE_SIZE_MAX,
  UID_MAX,
  UsageError,
  allowOnly,
  commandWords,
  parseCommandLine,
  parseGroup,
  parseGroups,
  parseLabels,
  parseSize,
  parseStates,
  parseUint,
  positionals,
} from './args';
import { AttachFailure, DEFAULT_HANDOFF, ExecFailure, runAttach } from './attach';
import { DEFAULT_HOTPLUG_PORTS, KNOWN_VMMS, MAX_PORTS, VmmArgsError, vmmArgs } from './vmmargs';
import * as fmt from './format';
import * as js from './json';
import { help, synopsisFor } from './usage';

type ClientModule = typeof import('../client/client');
type GrpcModule = typeof import('@grpc/grpc-js');
type HealthModule = typeof import('./health');

/**
 * The gRPC client and grpc-js, loaded on first use. Loading grpc-js loads
 * node:assert, which creates process.stderr to choose its colours, which
 * makes a pipe or socket stderr O_NONBLOCK: a flag of the open file, that
 * `attach` would hand on to its VMM. attach never loads them.
 */
const clientModule = (): ClientModule => require('../client/client') as ClientModule;
const grpcStatus = (): GrpcModule['status'] => (require('@grpc/grpc-js') as GrpcModule).status;
const healthModule = (): HealthModule => require('./health') as HealthModule;

interface Context {
  cl: CommandLine;
  /** The positionals after the command words. */
  args: string[];
  json: boolean;
  env: NodeJS.ProcessEnv;
  /** --timeout, when given. */
  timeoutMs: number | undefined;
  /** The client, created on first use so that usage errors never touch gRPC. */
  api(): KvmVfioApi;
  /** The API socket, for a call made without the client (health); failures are then described by it. */
  socket(): string;
  out(text: string): void;
  /** Work is left pending that must not keep the process alive: exit as soon as main() returns. */
  exitWhenDone(): void;
}

let stdoutReady = false;
let exitPromptly = false;

/**
 * process.stdout, created on first use. Creating it makes a pipe or socket
 * stdout O_NONBLOCK (see clientModule): attach never writes to stdout, so it
 * never creates it.
 */
function stdout(): NodeJS.WriteStream {
  if (!stdoutReady) {
    stdoutReady = true;
    // `kvmvfioctl ... | head` closes the pipe early: that is not an error.
    process.stdout.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'EPIPE') process.exit(0);
      throw e;
    });
  }
  return process.stdout;
}

interface Command {
  options: readonly OptionName[];
  /** Resolves to the exit status when it is not 0 without an error (health: not SERVING). */
  run(ctx: Context): Promise<void | number>;
}

const FILTER_OPTIONS: readonly OptionName[] = ['label', 'state'];

/** vm delete's deadline without --timeout: well past the daemon's default wait for a VMM to exit (10 s). */
export const DELETE_TIMEOUT_MS = 30_000;

const filterOf = (cl: CommandLine) => ({ labels: parseLabels(cl.values.label), states: parseStates(cl.values.state) });

/** VM commands that take only a VM: resolve the name, make the call, show the VM. */
function onVm(call: (api: KvmVfioApi, id: string) => Promise<Vm>, say: (vm: Vm) => string): Command {
  return {
    options: [],
    async run(ctx) {
      const [ref] = positionals(ctx.args, ['VM']);
      const api = ctx.api();
      const vm = await call(api, await api.resolveVm(ref));
      ctx.out(ctx.json ? js.pretty(js.vmJson(vm)) : say(vm));
    },
  };
}

/** add-group / remove-group: VM and a group number, checked before anything is sent. */
function onVmGroup(call: (api: KvmVfioApi, id: string, group: number) => Promise<Vm>, verb: string): Command {
  return {
    options: [],
    async run(ctx) {
      const [ref, groupText] = positionals(ctx.args, ['VM', 'GROUP']);
      const group = parseGroup(groupText);
      const api = ctx.api();
      const vm = await call(api, await api.resolveVm(ref), group);
      ctx.out(ctx.json ? js.pretty(js.vmJson(vm)) : `vm ${vm.name}: IOMMU group ${group} ${verb}; groups now ${vm.groups.length ? vm.groups.join(',') : 'none'}\n`);
    },
  };
}

/** Every command, by its command words; SYNOPSIS in usage.ts has each one's synopsis (test/unit/docs.test.ts holds them together). */
export const COMMANDS: Record<string, Command> = {
  completion: {
    options: [],
    async run(ctx) {
      const [shell] = positionals(ctx.args, ['SHELL']);
      if (shell !== 'bash') throw new UsageError(`completion: only bash is supported, not ${JSON.stringify(shell)}`);
      ctx.out((require('./completion') as typeof import('./completion')).bashCompletion());
    },
  },

  'policy check': {
    options: [],
    async run(ctx) {
      const [file] = positionals(ctx.args, ['FILE']);
      // Offline: the daemon is not asked. Names resolve against this host's /etc/passwd and /etc/group.
      const { Policy, PolicyError } = require('../broker/policy') as typeof import('../broker/policy');
      const { readAccounts } = require('../broker/accounts') as typeof import('../broker/accounts');
      try {
        const p = await Policy.load(file, readAccounts());
        if (!p) {
          ctx.out(ctx.json ? js.pretty({ ok: false, problems: [`${file}: no such file`] }) : `${file}: no such file\n`);
          return 1;
        }
        // What each principal may hold, defaults applied: the memlock defaults depend on admin.
        const { UNLIMITED } = require('../broker/policy') as typeof import('../broker/policy');
        const effective = p.principals.map((x) => ({
          name: x.name,
          admin: x.admin,
          limits: Object.fromEntries(Object.entries(x.limits).map(([k, v]) => [k, v >= UNLIMITED ? 'unlimited' : v])),
        }));
        if (ctx.json) ctx.out(js.pretty({ ok: true, principals: p.principalCount, effective }));
        else {
          const lines = effective.map((x) => `  ${x.name}${x.admin ? ' (admin)' : ''}: ${Object.entries(x.limits).map(([k, v]) => `${k} ${v}`).join(', ')}\n`);
          ctx.out(`${file}: valid, ${p.principalCount} principal(s)\n${lines.join('')}`);
        }
        return 0;
      } catch (e) {
        if (!(e instanceof PolicyError)) throw e;
        ctx.out(ctx.json ? js.pretty({ ok: false, problems: e.problems }) : `${file}: not valid\n${e.problems.map((x) => `  ${x}\n`).join('')}`);
        return 1;
      }
    },
  },

  info: {
    options: [],
    async run(ctx) {
      positionals(ctx.args, []);
      const h = await ctx.api().getHostInfo();
      ctx.out(ctx.json ? js.pretty(js.hostInfoJson(h)) : fmt.hostInfo(h));
    },
  },

  metrics: {
    options: [],
    async run(ctx) {
      positionals(ctx.args, []);
      const m = await ctx.api().getMetrics();
      ctx.out(ctx.json ? js.pretty({ content_type: m.content_type, text: m.text }) : m.text);
    },
  },

  health: {
    options: [],
    async run(ctx) {
      // "" asks about the daemon as a whole; kvmvfio.v1.KvmVfio about its API service.
      if (ctx.args.length > 1) positionals(ctx.args, ['SERVICE']);
      const service = ctx.args[0] ?? '';
      const status = await healthModule().checkHealth(ctx.socket(), service, ctx.timeoutMs ?? 10_000);
      ctx.out(ctx.json ? js.pretty({ status }) : `${status}\n`);
      return status === 'SERVING' ? 0 : 1;
    },
  },

  groups: {
    options: [],
    async run(ctx) {
      if (ctx.args.length > 1) positionals(ctx.args, ['GROUP']);
      if (ctx.args.length === 1) {
        const g = await ctx.api().getIommuGroup(parseGroup(ctx.args[0]));
        ctx.out(ctx.json ? js.pretty(js.groupJson(g)) : fmt.groupDetail(g));
        return;
      }
      const res = await ctx.api().listIommuGroups();
      if (ctx.json) ctx.out(js.pretty(js.groupsJson(res)));
      // An empty table would look like a bug; say why there is nothing.
      else ctx.out(res.groups.length ? fmt.groupTable(res.groups) : fmt.NO_IOMMU_GROUPS);
    },
  },

  'vm create': {
    options: ['vmm-uid', 'vfio-device', 'group', 'label', 'memlock', 'request-id', 'cdev'],
    async run(ctx) {
      const [name] = positionals(ctx.args, ['NAME']);
      const v = ctx.cl.values;
      if (v['vmm-uid'] === undefined) throw new UsageError('--vmm-uid UID is required (the uid the VMM will run as)');
      const vmmUid = parseUint(v['vmm-uid'], '--vmm-uid', UID_MAX);
      const groups = parseGroups(v.group);
      const vfioDevice = v['vfio-device'] ?? false;
      if (groups.length && !vfioDevice) throw new UsageError('--group needs --vfio-device (groups are added to the VM\'s KVM-VFIO device)');
      const res = await ctx.api().createVm({
        name,
        vmm_uid: vmmUid,
        vfio_device: vfioDevice,
        groups,
        labels: parseLabels(v.label),
        memlock_bytes: v.memlock === undefined ? '0' : parseSize(v.memlock, '--memlock'),
        request_id: v['request-id'] ?? '',
        vfio_handoff: v.cdev ? 'VFIO_HANDOFF_CDEV' : 'VFIO_HANDOFF_UNSPECIFIED',
      });
      if (ctx.json) ctx.out(js.pretty(js.createVmJson(res)));
      else if (res.vm) ctx.out(fmt.vmDetail(res.vm, fmt.attachTokenPairs(res.attach_token)));
    },
  },

  'vm get': onVm((api, id) => api.getVm(id), (vm) => fmt.vmDetail(vm)),

  'vm args': {
    options: ['vmm', 'hotplug-ports'],
    async run(ctx) {
      const [ref] = positionals(ctx.args, ['VM']);
      const vmm = ctx.cl.values.vmm;
      if (vmm === undefined) throw new UsageError('vm args needs --vmm qemu');
      if (!(KNOWN_VMMS as readonly string[]).includes(vmm)) throw new UsageError(`--vmm: one of ${KNOWN_VMMS.join(', ')}, not ${JSON.stringify(vmm)}`);
      const api = ctx.api();
      const vm = await api.getVm(await api.resolveVm(ref));
      const devices: string[] = [];
      if (vm.vfio_handoff === 'VFIO_HANDOFF_CDEV') for (const g of vm.groups) for (const d of (await api.getIommuGroup(g)).devices) devices.push(d.address);
      const spare = ctx.cl.values['hotplug-ports'];
      if (spare !== undefined && !(/^\d+$/.test(spare) && Number(spare) <= MAX_PORTS)) throw new UsageError(`--hotplug-ports: a number from 0 to ${MAX_PORTS}, not ${JSON.stringify(spare)}`);
      const args = vmmArgs(vm, vmm as (typeof KNOWN_VMMS)[number], devices, spare === undefined ? DEFAULT_HOTPLUG_PORTS : Number(spare));
      ctx.out(ctx.json ? js.pretty({ args }) : `${args.join(' ')}\n`);
    },
  },

  'vm token': {
    options: [],
    async run(ctx) {
      const [ref] = positionals(ctx.args, ['VM']);
      const api = ctx.api();
      const t = await api.createAttachToken(await api.resolveVm(ref));
      ctx.out(ctx.json ? js.pretty(js.tokenJson(t)) : fmt.keyValues(fmt.attachTokenPairs(t)));
    },
  },

  'vm list': {
    options: [...FILTER_OPTIONS, 'page-size'],
    async run(ctx) {
      positionals(ctx.args, []);
      const filter = filterOf(ctx.cl);
      const size = ctx.cl.values['page-size'];
      // Every page, then one table: the columns fit every row.
      const vms = await ctx.api().listAllVms({ ...filter, page_size: size === undefined ? 0 : parseUint(size, '--page-size', PAGE_SIZE_MAX) });
      if (ctx.json) ctx.out(js.pretty(js.vmsJson(vms)));
      else if (!vms.length) ctx.out(Object.keys(filter.labels).length || filter.states.length ? 'No VMs match.\n' : 'No VMs.\n');
      else ctx.out(fmt.vmTable(vms));
    },
  },

  'vm delete': {
    options: ['force'],
    async run(ctx) {
      const [ref] = positionals(ctx.args, ['VM']);
      const api = ctx.api();
      const res = await api.deleteVm({ vm_id: await api.resolveVm(ref), force: ctx.cl.values.force ?? false });
      if (ctx.json) ctx.out(js.pretty(js.deleteVmJson(res)));
      else ctx.out(res.vm ? `deleted vm ${res.vm.name} (${res.vm.id})\n` : 'deleted\n');
    },
  },

  'vm watch': {
    options: FILTER_OPTIONS,
    async run(ctx) {
      positionals(ctx.args, []);
      const filter = filterOf(ctx.cl);
      // Interrupting ends the watch as asked: exit 0. The stream's iterator
      // cannot be returned while it waits for an event, so exit outright;
      // stdout writes are synchronous for files, pipes and terminals here.
      const stop = () => process.exit(0);
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
      for await (const ev of ctx.api().watchVms(filter)) ctx.out(ctx.json ? js.line(js.eventJson(ev)) : fmt.eventLine(ev));
    },
  },

  'vm vfio-device': onVm(
    (api, id) => api.createVfioDevice(id),
    (vm) => `vm ${vm.name}: KVM-VFIO device ${vm.state === 'VM_STATE_PENDING' ? 'planned (created when its VMM attaches)' : 'created'}\n`,
  ),

  'vm add-group': onVmGroup((api, id, group) => api.addGroup({ vm_id: id, group }), 'added'),
  'vm remove-group': onVmGroup((api, id, group) => api.removeGroup({ vm_id: id, group }), 'removed'),

  conformance: {
    options: ['only'],
    async run(ctx) {
      const { cl } = ctx;
      const at = cl.terminatorAt;
      if (at === 0) throw new UsageError('conformance must come before --');
      const extra = cl.positionals.slice(1, at ?? cl.positionals.length);
      if (extra.length) throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])}: the VMM command and its arguments go after --`);
      const argv = at === undefined ? [] : cl.positionals.slice(at);
      if (!argv.length || argv[0] === '') throw new UsageError('missing -- VMM [ARG]...: the VMM to check');
      const { runConformance, formatReport } = require('../conformance/runner') as typeof import('../conformance/runner');
      const reports = await runConformance({ argv, waitMs: ctx.timeoutMs, only: cl.values.only, log: ctx.json ? undefined : (line) => process.stderr.write(`kvmvfioctl conformance: ${line}\n`) });
      ctx.out(ctx.json ? js.pretty({ rules: reports }) : formatReport(reports));
      return reports.some((r) => r.outcome === 'fail') ? 1 : 0;
    },
  },

  attach: {
    options: ['token', 'handoff'],
    async run(ctx) {
      const { cl, env } = ctx;
      const at = cl.terminatorAt;
      // `attach` itself must come before --, and nothing else may.
      if (at === 0) throw new UsageError('attach must come before --');
      const extra = cl.positionals.slice(1, at ?? cl.positionals.length);
      if (extra.length) throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])}: the VMM command and its arguments go after --`);
      if (at === undefined) throw new UsageError('missing -- CMD [ARG]...: the VMM command to run');
      const argv = cl.positionals.slice(at);
      if (!argv.length) throw new UsageError('missing CMD after --');
      if (argv[0] === '') throw new UsageError('CMD: empty');

      const token = cl.values.token ?? env.KVMVFIO_TOKEN ?? '';
      if (cl.values.token === '') throw new UsageError('--token: empty');
      if (!token) throw new UsageError('missing attach token: set KVMVFIO_TOKEN (or pass --token, which every user can read in ps)');
      if (cl.values.handoff === '') throw new UsageError('--handoff: empty path');
      const handoff = cl.values.handoff ?? (env.KVMVFIO_HANDOFF || DEFAULT_HANDOFF);
      await runAttach({ handoff, token, argv, timeoutMs: ctx.timeoutMs ?? 10_000, onAbandon: () => ctx.exitWhenDone() });
    },
  },
};

/** The message for a failed call; an unreachable daemon is named by its socket. */
function describe(e: ApiError, socket: string, timeoutMs: number | undefined): string {
  const Status = grpcStatus();
  const details = e.details || e.message;
  if (e.code === Status.UNAVAILABLE) {
    if (!existsSync(socket)) return `no kvmvfiod socket at ${socket}: is kvmvfiod running? (--socket PATH or KVMVFIO_SOCKET selects another)`;
    return `kvmvfiod at ${socket} is unavailable: ${details}`;
  }
  if (e.code === Status.DEADLINE_EXCEEDED) return `${details} (deadline ${timeoutMs ?? 10000} ms; --timeout MS changes it)`;
  return details;
}

export async function main(argv: string[], env: NodeJS.ProcessEnv = process.env): Promise<number> {
  let command: string | undefined;
  let json = false;
  /** --socket, else KVMVFIO_SOCKET; empty: the client's default. */
  let socket = env.KVMVFIO_SOCKET || '';
  let timeoutMs: number | undefined;
  let api: KvmVfioApi | undefined;
  /** The API socket once a call was made (by the client or by health). */
  let reached: string | undefined;
  try {
    const cl = parseCommandLine(argv);
    json = cl.values.json ?? false;
    if (cl.values.help) {
      stdout().write(help());
      return 0;
    }
    if (cl.values.version) {
      stdout().write(`kvmvfioctl ${DAEMON_VERSION}\n`);
      return 0;
    }
    if (cl.values.socket !== undefined) {
      if (cl.values.socket === '') throw new UsageError('--socket: empty path');
      socket = cl.values.socket;
    }
    if (cl.values.timeout !== undefined) {
      timeoutMs = parseUint(cl.values.timeout, '--timeout', 2 ** 31 - 1);
      if (timeoutMs === 0) throw new UsageError('--timeout: must be at least 1 ms');
    }

    const [first, second, ...rest] = cl.positionals;
    if (first === undefined) throw new UsageError('missing command');
    if (first === 'help') {
      stdout().write(help());
      return 0;
    }
    let args: string[];
    if (first === 'policy') {
      if (second === undefined || !Object.hasOwn(COMMANDS, `policy ${second}`)) throw new UsageError(`unknown command policy ${second ?? ''}`.trim());
      command = `policy ${second}`;
      args = rest;
    } else if (first === 'vm') {
      command = 'vm';
      if (second === undefined) throw new UsageError('missing vm subcommand');
      if (!Object.hasOwn(COMMANDS, `vm ${second}`)) throw new UsageError(`unknown command vm ${second}`);
      command = `vm ${second}`;
      args = rest;
    } else {
      // hasOwn: "toString" is not a command.
      if (!Object.hasOwn(COMMANDS, first) || first.startsWith('vm ')) throw new UsageError(`unknown command ${first}`);
      command = first;
      args = cl.positionals.slice(1);
    }
    const cmd = COMMANDS[command];
    allowOnly(cl, command, cmd.options);
    // DeleteVm waits for the VMM to exit (kvmvfiod's --vmm-exit-grace-ms, 10 s by default): a longer
    // deadline lets the daemon's own answer arrive, which says what to do ("force kills it").
    if (command === 'vm delete') timeoutMs ??= DELETE_TIMEOUT_MS;
    const sock = socket;
    const status = await cmd.run({
      cl,
      args,
      json,
      env,
      timeoutMs,
      api: () => {
        api ??= new (clientModule().KvmVfioApi)(sock || clientModule().DEFAULT_SOCKET, { timeoutMs });
        reached = api.socket;
        return api;
      },
      socket: () => (reached = sock || clientModule().DEFAULT_SOCKET),
      out: (text) => stdout().write(text),
      exitWhenDone: () => (exitPromptly = true),
    });
    return status ?? 0;
  } catch (e) {
    if (e instanceof UsageError) {
      command ??= commandWords(argv).join(' ') || undefined;
      process.stderr.write(`kvmvfioctl: ${e.message}\n${synopsisFor(command)}\nRun 'kvmvfioctl --help' for more.\n`);
      return 2;
    }
    // Only a call makes an ApiError, and a call needs the client loaded.
    const [code, message] = reached !== undefined && clientModule().isApiError(e)
      ? [grpcStatus()[e.code] ?? `CODE_${e.code}`, describe(e, reached, timeoutMs)]
      : e instanceof AttachFailure || e instanceof ExecFailure || e instanceof VmmArgsError
        ? [e.code, e.message]
        : ['UNKNOWN', e instanceof Error ? e.message : String(e)];
    process.stderr.write(json ? js.line({ error: { code, message } }) : `kvmvfioctl: ${code}: ${message}\n`);
    return e instanceof ExecFailure ? e.exitCode : 1;
  } finally {
    api?.close();
  }
}

if (require.main === module) {
  void main(process.argv.slice(2)).then((code) => {
    // stderr and stdout writes are synchronous for files, pipes and terminals here.
    if (exitPromptly) process.exit(code);
    process.exitCode = code;
  });
}
