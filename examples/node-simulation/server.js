#!/usr/bin/env node
// A CartPole simulation served over rl_service.v1.EnvironmentService (docs/environment-protocol.md), in Node.js.
//
//   node server.js [--host H] [--port P | --unix PATH] [--num-envs N] [--raw-observations] [--step-cost-us US]
//
// Hosts N CartPole envs that step together. First stdout line: "serving NAME (N envs) on ADDRESS", where ADDRESS
// is what the training service's env_id takes (grpc://HOST:PORT or unix:///ABS/PATH).
'use strict';

const fs = require('fs');
const net = require('net');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = path.join('rl_service_proto', 'v1', 'environment.proto');
const ENV_NAME = 'CartPole-v1';
const VERSION = '0.1.0 (node-simulation)';

// ------------------------------------------------------------------------------------------------ random numbers

const MASK64 = (1n << 64n) - 1n;

// SplitMix64 over BigInt: turns any integer seed (seed + i may exceed int64) into well-mixed 64-bit words.
function splitmix64(state) {
  let s = BigInt.asUintN(64, state);
  return () => {
    s = (s + 0x9e3779b97f4a7c15n) & MASK64;
    let z = s;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
    return z ^ (z >> 31n);
  };
}

// xoshiro128** with 32-bit state words; seeded from splitmix64. Deterministic for a given seed.
class Rng {
  constructor(seed) {
    const next = splitmix64(BigInt(seed));
    const a = next();
    const b = next();
    this.s = new Uint32Array([Number(a & 0xffffffffn), Number(a >> 32n), Number(b & 0xffffffffn), Number(b >> 32n)]);
    if ((this.s[0] | this.s[1] | this.s[2] | this.s[3]) === 0) this.s[0] = 1;
  }

  static fromEntropy() {
    return new Rng(BigInt.asUintN(64, BigInt('0x' + require('crypto').randomBytes(8).toString('hex'))));
  }

  nextUint32() {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  // Uniform in [0, 1) with 53 random bits.
  nextDouble() {
    const hi = this.nextUint32() >>> 5; // 27 bits
    const lo = this.nextUint32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }

  uniform(low, high) {
    return low + (high - low) * this.nextDouble();
  }
}

function rotl(x, k) {
  return (x << k) | (x >>> (32 - k));
}

// ------------------------------------------------------------------------------------------------ CartPole

// The classic cart-pole (Barto, Sutton & Anderson 1983) with CartPole-v1's constants and limits.
const GRAVITY = 9.8;
const MASS_CART = 1.0;
const MASS_POLE = 0.1;
const TOTAL_MASS = MASS_CART + MASS_POLE;
const HALF_LENGTH = 0.5;
const POLE_MASS_LENGTH = MASS_POLE * HALF_LENGTH;
const FORCE_MAG = 10.0;
const TAU = 0.02;
const THETA_LIMIT = (12 * 2 * Math.PI) / 360; // 12 degrees, in radians
const X_LIMIT = 2.4;
const MAX_EPISODE_STEPS = 500;
const OBS_SIZE = 4;
const NUM_ACTIONS = 2;

class CartPole {
  constructor() {
    this.rng = Rng.fromEntropy();
    this.state = new Float64Array(OBS_SIZE); // x, x_dot, theta, theta_dot
    this.steps = 0;
  }

  // seed: a BigInt, or null to go on with this env's own random stream.
  reset(seed) {
    if (seed !== null) this.rng = new Rng(seed);
    for (let k = 0; k < OBS_SIZE; k++) this.state[k] = this.rng.uniform(-0.05, 0.05);
    this.steps = 0;
  }

  // Advances one step (Euler). Returns [reward, terminated, truncated]; this.state is then the step's observation.
  step(action) {
    const st = this.state;
    const x = st[0];
    const xDot = st[1];
    const theta = st[2];
    const thetaDot = st[3];
    const force = action === 1 ? FORCE_MAG : -FORCE_MAG;
    const cos = Math.cos(theta);
    const sin = Math.sin(theta);
    const temp = (force + POLE_MASS_LENGTH * thetaDot * thetaDot * sin) / TOTAL_MASS;
    const thetaAcc = (GRAVITY * sin - cos * temp) / (HALF_LENGTH * (4.0 / 3.0 - (MASS_POLE * cos * cos) / TOTAL_MASS));
    const xAcc = temp - (POLE_MASS_LENGTH * thetaAcc * cos) / TOTAL_MASS;
    st[0] = x + TAU * xDot;
    st[1] = xDot + TAU * xAcc;
    st[2] = theta + TAU * thetaDot;
    st[3] = thetaDot + TAU * thetaAcc;
    this.steps += 1;
    const terminated = st[0] < -X_LIMIT || st[0] > X_LIMIT || st[2] < -THETA_LIMIT || st[2] > THETA_LIMIT;
    const truncated = this.steps >= MAX_EPISODE_STEPS;
    if (!st.every(Number.isFinite)) throw new Error(`env state is not finite: [${Array.from(st)}]`);
    return [1.0, terminated, truncated];
  }
}

// ------------------------------------------------------------------------------------------------ protocol

class ProtocolError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }

  toStatus() {
    return { code: this.code, details: this.message };
  }
}

const invalid = (message) => new ProtocolError(grpc.status.INVALID_ARGUMENT, message);

// The one set of envs this process serves, shared by the unary calls and every Session stream. Node runs each
// handler to completion on one thread, so a Reset or Step is never interleaved with another.
// Busy work standing in for an expensive simulator (benchmarks): spins, as a game engine computes, for `ns`
// nanoseconds. The reference server's --step-cost-us (rl_service/envserver/step_cost.py) does the same.
function spin(ns) {
  const deadline = process.hrtime.bigint() + ns;
  while (process.hrtime.bigint() < deadline) {
    // busy
  }
}

class Simulation {
  constructor(numEnvs, rawObservations, stepCostUs = 0) {
    this.stepCostNs = BigInt(Math.round(stepCostUs * 1000));
    this.numEnvs = numEnvs;
    this.raw = rawObservations;
    this.envs = Array.from({ length: numEnvs }, () => new CartPole());
    this.needsReset = true;
    this.resetOnce = false;
  }

  spec() {
    const inf = Infinity;
    return {
      observation_space: {
        box: {
          shape: [OBS_SIZE],
          dtype: 'float32',
          // CartPole-v1's bounds: twice the termination limits for x and theta, unbounded velocities.
          low: [-2 * X_LIMIT, -inf, -2 * THETA_LIMIT, -inf],
          high: [2 * X_LIMIT, inf, 2 * THETA_LIMIT, inf],
        },
      },
      action_space: { discrete: { n: NUM_ACTIONS } },
      num_envs: this.numEnvs,
      name: ENV_NAME,
      version: VERSION,
      protocol_version: 2, // Step also takes env_ids (a subset of the envs)
    };
  }

  tensor(values) {
    const f32 = Float32Array.from(values);
    if (this.raw) return { raw: Buffer.from(f32.buffer, f32.byteOffset, f32.byteLength) }; // little-endian on x86/arm
    return { float32: { values: Array.from(f32) } };
  }

  reset(request) {
    let seed = null;
    if (request.seed !== undefined && request.seed !== null) {
      seed = BigInt(request.seed);
      if (seed < 0n) throw invalid(`seed must be >= 0, got ${seed}`);
    }
    this.needsReset = true;
    const obs = [];
    try {
      for (let i = 0; i < this.numEnvs; i++) {
        const env = this.envs[i];
        env.reset(seed === null ? null : seed + BigInt(i));
        for (let k = 0; k < OBS_SIZE; k++) obs.push(env.state[k]);
      }
    } catch (err) {
      throw new ProtocolError(grpc.status.INTERNAL, `Reset failed: ${err.message}`);
    }
    this.needsReset = false;
    this.resetOnce = true;
    return { observations: this.tensor(obs) };
  }

  // The envs a Step names (protocol version 2): distinct, each in [0, numEnvs); every env when empty. Refuses
  // (INVALID_ARGUMENT, naming env_ids) without touching any env.
  envIds(request) {
    const ids = (request.env_ids || []).map(Number);
    if (ids.length === 0) return Array.from({ length: this.numEnvs }, (_, i) => i);
    const seen = new Set();
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= this.numEnvs) {
        throw invalid(`env_ids: ${id} is outside [0, ${this.numEnvs})`);
      }
      if (seen.has(id)) throw invalid(`env_ids: env ${id} is named twice`);
      seen.add(id);
    }
    return ids;
  }

  // Decodes and checks one action per stepped env; refuses (INVALID_ARGUMENT) without touching any env.
  actions(request, count, subset) {
    const tensor = request.actions;
    if (!tensor || !tensor.payload) {
      throw invalid(`actions: missing; send ${count} actions as an int64 tensor`);
    }
    if (tensor.payload !== 'int64') {
      throw invalid(`actions: expected an int64 payload for a Discrete(${NUM_ACTIONS}) action space, got ${tensor.payload}`);
    }
    const values = (tensor.int64 && tensor.int64.values) || [];
    if (values.length !== count) {
      throw invalid(subset ? `env_ids: ${count} envs named, and ${values.length} actions sent; send one per env`
        : `actions: expected ${count} values (one per env), got ${values.length}`);
    }
    const actions = new Int32Array(count);
    for (let i = 0; i < values.length; i++) {
      const a = Number(values[i]);
      if (!(a === 0 || a === 1)) throw invalid(`actions[${i}] = ${values[i]}: must be in [0, ${NUM_ACTIONS})`);
      actions[i] = a;
    }
    return actions;
  }

  // Steps every env, or the envs in env_ids (answered in that order; the others are left as they are).
  step(request) {
    const ids = this.envIds(request);
    const actions = this.actions(request, ids.length, (request.env_ids || []).length > 0);
    if (this.needsReset) {
      throw new ProtocolError(
        grpc.status.FAILED_PRECONDITION,
        this.resetOnce ? 'Reset is required: the last Reset or Step failed' : 'Reset is required before the first Step',
      );
    }
    this.needsReset = true; // until every env has stepped
    const n = ids.length;
    const obs = new Array(n * OBS_SIZE);
    const finals = [];
    const rewards = new Array(n);
    const terminated = new Array(n);
    const truncated = new Array(n);
    try {
      for (let row = 0; row < n; row++) {
        const env = this.envs[ids[row]];
        if (this.stepCostNs > 0n) spin(this.stepCostNs);
        const [reward, term, trunc] = env.step(actions[row]);
        rewards[row] = reward;
        terminated[row] = term;
        truncated[row] = trunc;
        if (term || trunc) {
          for (let k = 0; k < OBS_SIZE; k++) finals.push(env.state[k]); // the ended episode's last observation
          env.reset(null); // auto-reset, no seed
        }
        for (let k = 0; k < OBS_SIZE; k++) obs[row * OBS_SIZE + k] = env.state[k];
      }
    } catch (err) {
      throw new ProtocolError(grpc.status.INTERNAL, `Step failed: ${err.message}`);
    }
    this.needsReset = false;
    const response = { observations: this.tensor(obs), rewards, terminated, truncated };
    if (finals.length > 0) response.final_observations = this.tensor(finals);
    return response;
  }
}

function unexpected(err) {
  console.error('unexpected error:', err);
  return { code: grpc.status.INTERNAL, details: `simulation error: ${err && err.message}` };
}

function toStatus(err) {
  return err instanceof ProtocolError ? err.toStatus() : unexpected(err);
}

function makeService(sim) {
  return {
    GetSpec(call, callback) {
      callback(null, sim.spec());
    },
    Reset(call, callback) {
      try {
        callback(null, sim.reset(call.request));
      } catch (err) {
        callback(toStatus(err));
      }
    },
    Step(call, callback) {
      try {
        callback(null, sim.step(call.request));
      } catch (err) {
        callback(toStatus(err));
      }
    },
    // One answer per request, in order. Each request is handled synchronously inside its 'data' event, so the
    // answer is written before the next request is read. A failure ends the stream with the unary call's status.
    Session(call) {
      let done = false;
      const fail = (status) => {
        done = true;
        call.emit('error', status); // grpc-js: sends this status and ends the stream
      };
      call.on('data', (request) => {
        if (done) return;
        try {
          if (request.request === 'reset') call.write({ reset: sim.reset(request.reset || {}) });
          else if (request.request === 'step') call.write({ step: sim.step(request.step || {}) });
          else fail({ code: grpc.status.INVALID_ARGUMENT, details: 'SessionRequest: set reset or step' });
        } catch (err) {
          fail(toStatus(err));
        }
      });
      call.on('end', () => {
        if (!done) {
          done = true;
          call.end(); // the client half-closed: OK
        }
      });
      call.on('cancelled', () => {
        done = true;
      });
    },
  };
}

// ------------------------------------------------------------------------------------------------ command line

function usage(message) {
  if (message) console.error(`error: ${message}`);
  console.error(
    'usage: node server.js [--host HOST] [--port PORT | --unix PATH] [--num-envs N] [--raw-observations]\n' +
      '                      [--step-cost-us US]\n' +
      '  --host HOST         address to listen on (default 127.0.0.1)\n' +
      '  --port PORT         TCP port (default 50061); 0 picks a free one\n' +
      '  --unix PATH         listen on this unix domain socket instead (not with --host/--port)\n' +
      '  --num-envs N        envs stepped together, 1..1024 (default 8)\n' +
      '  --raw-observations  send observations as little-endian float32 bytes\n' +
      '  --step-cost-us US   busy work per env step, in microseconds, standing in for an expensive simulator\n' +
      '                      (benchmarks; 0..1000000, default 0)',
  );
  process.exit(message ? 2 : 0);
}

function parseArgs(argv) {
  const opts = { host: null, port: null, unix: null, numEnvs: 8, raw: false, stepCostUs: 0 };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value = null;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const take = () => {
      if (value !== null) return value;
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      return argv[++i];
    };
    const int = (text, lo, hi) => {
      if (!/^\d+$/.test(text) || Number(text) < lo || Number(text) > hi) usage(`${arg}: expected an integer in ${lo}..${hi}, got '${text}'`);
      return Number(text);
    };
    switch (arg) {
      case '-h':
      case '--help':
        usage();
        break;
      case '--host':
        opts.host = take();
        break;
      case '--port':
        opts.port = int(take(), 0, 65535);
        break;
      case '--unix':
        opts.unix = take();
        if (!opts.unix) usage('--unix: empty path');
        break;
      case '--num-envs':
        opts.numEnvs = int(take(), 1, 1024);
        break;
      case '--raw-observations':
        opts.raw = true;
        break;
      case '--step-cost-us': {
        const text = take();
        const us = Number(text);
        if (!/^\d+(\.\d+)?$/.test(text) || us > 1000000) usage(`${arg}: expected a number in 0..1000000, got '${text}'`);
        opts.stepCostUs = us;
        break;
      }
      default:
        usage(`unknown argument '${argv[i]}'`);
    }
  }
  if (opts.unix !== null && (opts.host !== null || opts.port !== null)) usage('--unix cannot be combined with --host/--port');
  if (opts.host === null) opts.host = '127.0.0.1';
  if (opts.port === null) opts.port = 50061;
  return opts;
}

// A socket file a previous run left behind is removed; a live server's socket, or any other file, is not.
function clearStaleSocket(socketPath) {
  return new Promise((resolve, reject) => {
    let st;
    try {
      st = fs.lstatSync(socketPath);
    } catch (err) {
      if (err.code === 'ENOENT') return resolve();
      return reject(err);
    }
    if (!st.isSocket()) return reject(new Error(`${socketPath} exists and is not a socket; not replacing it`));
    const probe = net.connect(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      reject(new Error(`${socketPath}: a server is already listening there`));
    });
    probe.once('error', (err) => {
      if (err.code !== 'ECONNREFUSED') return reject(err);
      fs.unlinkSync(socketPath);
      resolve();
    });
  });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto (snake_case)
    longs: String, // int64 as decimal strings: seeds stay exact
    enums: String,
    defaults: false, // unset optional fields (seed) stay undefined
    arrays: true, // unset repeated fields read as []
    oneofs: true, // request.request / tensor.payload name the member that is set
  });
  const proto = grpc.loadPackageDefinition(definition).rl_service.v1;
  const sim = new Simulation(opts.numEnvs, opts.raw, opts.stepCostUs);
  const server = new grpc.Server();
  server.addService(proto.EnvironmentService.service, makeService(sim));

  let bindTarget;
  let address;
  let socketPath = null;
  if (opts.unix !== null) {
    socketPath = path.resolve(opts.unix);
    await clearStaleSocket(socketPath);
    bindTarget = `unix://${socketPath}`;
    address = `unix://${socketPath}`;
  } else {
    const host = opts.host.includes(':') && !opts.host.startsWith('[') ? `[${opts.host}]` : opts.host;
    bindTarget = `${host}:${opts.port}`;
  }
  const port = await new Promise((resolve, reject) =>
    server.bindAsync(bindTarget, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  if (socketPath === null) {
    const host = opts.host.includes(':') && !opts.host.startsWith('[') ? `[${opts.host}]` : opts.host;
    address = `grpc://${host}:${port}`;
  }

  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    server.forceShutdown();
    if (socketPath !== null) {
      try {
        fs.unlinkSync(socketPath);
      } catch (err) {
        if (err.code !== 'ENOENT') console.error(`could not remove ${socketPath}: ${err.message}`);
      }
    }
    process.exit(signal === 'SIGINT' ? 130 : 0);
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));

  // The first stdout line, as the reference server prints it: a test or script reads the address from it.
  process.stdout.write(`serving ${ENV_NAME} (${opts.numEnvs} envs) on ${address}\n`);
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
