/**
 * Who may do what: the policy file (default /etc/kvmvfiod/policy.json),
 * validated with a schema (zod) whose errors say where and what. Principals
 * are matched by uid, gid, user or group name; the first that matches a
 * caller applies. uid 0 may always do everything. Without a policy file
 * only uid 0 may call.
 *
 * {
 *   "principals": [{
 *     "name": "orchestrator",
 *     "match": { "users": ["nova"], "groups": ["kvmvfio"], "uids": [1000], "gids": [] },
 *     "admin": false,                      // sees and changes every VM
 *     "calls": ["*"],                      // or ["GetHostInfo", "CreateVm", ...]
 *     "iommuGroups": [12, "20-31"],        // or "all"
 *     "vmmUids": ["64000-64999"],          // or "any"
 *     "limits": { "vms": 50, "groups": 16, "pendingTokens": 20,
 *                 "memlockPerVmBytes": "64G", "memlockBytes": "256G" }   // bytes, K/M/G/T, or "unlimited"
 *   }]
 * }
 *
 * Memlock limits default to 0 (no RLIMIT_MEMLOCK may be asked) for a
 * principal that is not an admin, and to unlimited for an admin; uid 0 is
 * always unlimited.
 */
import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import type { Accounts } from './accounts';
import { PermissionDeniedError } from './errors';

export const CALLS = [
  'GetHostInfo',
  'ListIommuGroups',
  'GetIommuGroup',
  'GetMetrics',
  'CreateVm',
  'GetVm',
  'CreateAttachToken',
  'ListVms',
  'DeleteVm',
  'CreateVfioDevice',
  'AddGroup',
  'RemoveGroup',
  'WatchVms',
] as const;
export type CallName = (typeof CALLS)[number];

/** The principal uid 0 always acts as; reserved in policy files. */
export const ROOT_NAME = 'root';

const MAX_ID = 0xfffffffe;
const id = z.number().int().min(0).max(MAX_ID);
/** A number, or an inclusive range "a-b" with a ≤ b. */
const idOrRange = z.union([
  id,
  z
    .string()
    .regex(/^\d+-\d+$/, 'a range is written "first-last", e.g. "20-31"')
    .refine((r) => {
      const [a, b] = r.split('-').map(Number);
      return a <= b && b <= MAX_ID;
    }, 'a range needs first ≤ last ≤ 4294967294'),
]);
const name = z.string().min(1).max(64);

/** The largest limit a policy may write; any limit at or above it is no limit (`"unlimited"`). */
export const UNLIMITED = Number.MAX_SAFE_INTEGER;
const SIZE_UNITS: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };
/** Bytes: a number, a string of digits with K, M, G or T (powers of 1024, as kvmvfioctl --memlock), or "unlimited". */
const byteLimit = z.unknown().transform((v, ctx): number => {
  const refuse = (message: string) => {
    ctx.addIssue({ code: z.ZodIssueCode.custom, message });
    return z.NEVER;
  };
  if (typeof v === 'number') {
    if (!Number.isSafeInteger(v) || v < 0) return refuse(`${v} is not a whole number of bytes from 0 to ${UNLIMITED}; write "unlimited" for no limit`);
    return v;
  }
  if (v === 'unlimited') return UNLIMITED;
  const m = typeof v === 'string' ? /^([0-9]{1,16})(?:([KMGTkmgt])(?:iB)?)?$/.exec(v) : null;
  if (!m) return refuse(`${JSON.stringify(v)} is not a size: bytes, or a number with K, M, G or T (e.g. "64G"), or "unlimited"`);
  const bytes = Number(m[1]) * SIZE_UNITS[(m[2] ?? '').toLowerCase()];
  if (!Number.isSafeInteger(bytes)) return refuse(`${v} is more than ${UNLIMITED} bytes; write "unlimited" for no limit`);
  return bytes;
});

const principalSchema = z
  .object({
    name: z
      .string()
      .regex(/^[A-Za-z0-9._-]{1,64}$/, 'a name is 1-64 characters of [A-Za-z0-9._-]')
      // VMs belong to principals by name: a principal called root would own uid 0's VMs.
      .refine((n) => n.toLowerCase() !== ROOT_NAME, `"${ROOT_NAME}" is the built-in principal of uid 0 and cannot be given to another (in any case)`),
    match: z
      .object({
        uids: z.array(id).max(1024).default([]),
        gids: z.array(id).max(1024).default([]),
        users: z.array(name).max(1024).default([]),
        groups: z.array(name).max(1024).default([]),
      })
      .strict()
      .refine((m) => m.uids.length + m.gids.length + m.users.length + m.groups.length > 0, 'match names at least one uid, gid, user or group'),
    admin: z.boolean().default(false),
    calls: z.array(z.enum(['*', ...CALLS])).max(64),
    iommuGroups: z.union([z.literal('all'), z.array(idOrRange).max(1024)]).default([]),
    vmmUids: z.union([z.literal('any'), z.array(idOrRange).max(1024)]).default([]),
    limits: z
      .object({
        vms: z.number().int().min(0).max(1_000_000).default(100),
        groups: z.number().int().min(0).max(1_000_000).default(64),
        pendingTokens: z.number().int().min(0).max(1_000_000).default(100),
        /** The most RLIMIT_MEMLOCK one VM may ask (memlock_bytes). Default: 0, or unlimited for an admin. */
        memlockPerVmBytes: byteLimit.optional(),
        /** The most memlock_bytes its live (PENDING or RUNNING) VMs may ask together. Default: 0, or unlimited for an admin. */
        memlockBytes: byteLimit.optional(),
      })
      .strict()
      .default({}),
  })
  .strict();

export const policySchema = z
  .object({
    principals: z.array(principalSchema).max(1024),
  })
  .strict()
  .refine((p) => new Set(p.principals.map((x) => x.name)).size === p.principals.length, 'principal names must be unique');

export type PolicyFile = z.infer<typeof policySchema>;
type PrincipalSpec = PolicyFile['principals'][number];

export interface Limits {
  vms: number;
  groups: number;
  pendingTokens: number;
  /** UNLIMITED: no limit. */
  memlockPerVmBytes: number;
  memlockBytes: number;
}

export interface Principal {
  name: string;
  admin: boolean;
  limits: Limits;
  mayCall(call: string): boolean;
  mayUseGroup(n: number): boolean;
  mayNameVmmUid(uid: number): boolean;
}

/** A policy that does not load: every problem, each as "where: what". */
export class PolicyError extends Error {
  readonly problems: string[];
  constructor(path: string, problems: string[]) {
    super(`${path}: ${problems.join('; ')}`);
    this.name = 'PolicyError';
    this.problems = problems;
  }
}

function inRanges(list: 'all' | 'any' | (number | string)[], n: number): boolean {
  if (list === 'all' || list === 'any') return true;
  return list.some((x) => {
    if (typeof x === 'number') return x === n;
    const [a, b] = x.split('-').map(Number);
    return n >= a && n <= b;
  });
}

const ROOT: Principal = {
  name: ROOT_NAME,
  admin: true,
  limits: { vms: UNLIMITED, groups: UNLIMITED, pendingTokens: UNLIMITED, memlockPerVmBytes: UNLIMITED, memlockBytes: UNLIMITED },
  mayCall: () => true,
  mayUseGroup: () => true,
  mayNameVmmUid: () => true,
};

interface Compiled {
  spec: PrincipalSpec;
  principal: Principal;
  uids: Set<number>;
  gids: Set<number>;
}

export interface CallerIds {
  uid: number;
  gid: number;
}

export class Policy {
  /** Where it came from ("none": no file, only root). */
  readonly source: string;
  readonly #compiled: Compiled[];
  readonly #accounts: Accounts | undefined;
  readonly #byName: Map<string, Principal>;

  private constructor(source: string, compiled: Compiled[], accounts?: Accounts) {
    this.source = source;
    this.#compiled = compiled;
    this.#accounts = accounts;
    this.#byName = new Map([[ROOT_NAME, ROOT], ...compiled.map((c): [string, Principal] => [c.principal.name, c.principal])]);
  }

  /** No policy file: only uid 0 may call. */
  static rootOnly(): Policy {
    return new Policy('none', []);
  }

  /** Validates a parsed document. Throws PolicyError listing every problem with its path. */
  static fromDocument(doc: unknown, source: string, accounts: Accounts): Policy {
    const parsed = policySchema.safeParse(doc);
    if (!parsed.success) {
      throw new PolicyError(
        source,
        parsed.error.issues.map((i) => `${i.path.length ? i.path.map((p) => (typeof p === 'number' ? `[${p}]` : `.${p}`)).join('').replace(/^\./, '') : '(top)'}: ${i.message}`),
      );
    }
    const problems: string[] = [];
    const compiled = parsed.data.principals.map((spec, i) => {
      const uids = new Set(spec.match.uids);
      const gids = new Set(spec.match.gids);
      spec.match.users.forEach((u, j) => {
        const uid = accounts.uidOf(u);
        if (uid === undefined) problems.push(`principals[${i}].match.users[${j}]: no user "${u}" on this host`);
        else uids.add(uid);
      });
      spec.match.groups.forEach((g, j) => {
        const gid = accounts.gidOf(g);
        if (gid === undefined) problems.push(`principals[${i}].match.groups[${j}]: no group "${g}" on this host`);
        else gids.add(gid);
      });
      const all = spec.calls.includes('*');
      const calls = new Set<string>(spec.calls);
      // Memlock is host memory pinned for good: none unless the policy grants it, but an admin is trusted with it.
      const memlockDefault = spec.admin ? UNLIMITED : 0;
      const principal: Principal = {
        name: spec.name,
        admin: spec.admin,
        limits: {
          vms: spec.limits.vms,
          groups: spec.limits.groups,
          pendingTokens: spec.limits.pendingTokens,
          memlockPerVmBytes: spec.limits.memlockPerVmBytes ?? memlockDefault,
          memlockBytes: spec.limits.memlockBytes ?? memlockDefault,
        },
        mayCall: (c) => all || calls.has(c),
        mayUseGroup: (n) => inRanges(spec.iommuGroups, n),
        mayNameVmmUid: (u) => inRanges(spec.vmmUids, u),
      };
      return { spec, principal, uids, gids };
    });
    if (problems.length) throw new PolicyError(source, problems);
    return new Policy(source, compiled, accounts);
  }

  /** Reads and validates a policy file. ENOENT → undefined (no policy). */
  static async load(path: string, accounts: Accounts): Promise<Policy | undefined> {
    let text: string;
    try {
      text = await readFile(path, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new PolicyError(path, [`cannot read: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`]);
    }
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch (e) {
      throw new PolicyError(path, [`not JSON: ${(e as Error).message}`]);
    }
    return Policy.fromDocument(doc, path, accounts);
  }

  get principalCount(): number {
    return this.#compiled.length;
  }

  /** The principal of that name ("root": uid 0's), or undefined when this policy has none. */
  principalNamed(name: string): Principal | undefined {
    return this.#byName.get(name);
  }

  /** Every principal of the file with what it may hold, defaults applied, in file order. */
  get principals(): readonly Principal[] {
    return this.#compiled.map((c) => c.principal);
  }

  /** The principal a caller acts as: root, the first principal that matches, or none. */
  principalOf(caller: CallerIds): Principal | undefined {
    if (caller.uid === 0) return ROOT;
    const userName = this.#accounts?.nameOfUid(caller.uid);
    for (const c of this.#compiled) {
      if (c.uids.has(caller.uid) || c.gids.has(caller.gid)) return c.principal;
      if (userName) for (const g of c.gids) if (this.#accounts!.membersOf(g).includes(userName)) return c.principal;
    }
    return undefined;
  }

  /** Throws PermissionDeniedError naming what is missing. */
  authorize(caller: CallerIds, call: string): Principal {
    const p = this.principalOf(caller);
    if (!p) {
      throw new PermissionDeniedError(
        this.source === 'none'
          ? `${call}: uid ${caller.uid} may not call kvmvfiod (no policy is loaded, so only uid 0 may)`
          : `${call}: uid ${caller.uid} (gid ${caller.gid}) matches no principal of the policy ${this.source}`,
      );
    }
    if (!p.mayCall(call)) throw new PermissionDeniedError(`${call}: principal ${p.name} lacks the permission to call ${call}`);
    return p;
  }
}
