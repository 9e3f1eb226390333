// A pagetrack client in Node.js, made from proto/pagetrack/v1/pagetrack.proto alone
// (@grpc/grpc-js and @grpc/proto-loader; no generated code, no Python).
//
// It creates a VM with one memslot, write-tracks two pages, opens a Watch stream, makes
// guest writes, prints each write event the stream delivers, reads the memory back, and
// deletes the VM.
//
//   npm ci && node watch_writes.js --target 127.0.0.1:50051 --writes 8
//
// Options: --target HOST:PORT (PAGETRACK_TARGET), --token TOKEN (PAGETRACK_TOKEN),
// --vm NAME, --writes N, --proto PATH (the .proto file, found in the repository by
// default), --timeout SECONDS (give up on a stuck daemon).
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function parseArgs(argv) {
  const opts = {
    target: process.env.PAGETRACK_TARGET || '127.0.0.1:50051',
    token: process.env.PAGETRACK_TOKEN || '',
    vm: `node-${process.pid}`,
    writes: 8,
    proto: path.join(__dirname, '..', '..', 'proto', 'pagetrack', 'v1', 'pagetrack.proto'),
    timeout: 30,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!(key in opts) || argv[i + 1] === undefined) {
      throw new Error(`unknown option ${argv[i]}; see the comment at the top of this file`);
    }
    opts[key] = typeof opts[key] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
  }
  return opts;
}

function loadApi(protoPath) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true, // field names as in the .proto: base_gfn, not baseGfn
    longs: String, // uint64/fixed64 as decimal strings: JavaScript numbers stop at 2^53
    enums: String,
    defaults: true,
    oneofs: true, // WatchResponse.kind names which record a message is
  });
  return grpc.loadPackageDefinition(definition).pagetrack.v1;
}

// A unary call as a promise: unary(client, 'CreateVm', {...}).
function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// x86 stores are little-endian: the bytes of a 64-bit store of `value`.
function u64le(value) {
  const buf = Buffer.alloc(8);
  buf.writeBigUInt64LE(BigInt(value));
  return buf;
}

// The events of one EventBatch: columns, and event i's bytes at data[sum(length[:i])...].
function* eventsOf(batch) {
  let offset = 0;
  for (let i = 0; i < batch.seq.length; i++) {
    const omitted = (batch.flags[i] & 4) !== 0; // bit 2: data omitted
    const n = omitted ? 0 : batch.length[i];
    yield {
      seq: BigInt(batch.seq[i]),
      gpa: BigInt(batch.gpa[i]),
      length: batch.length[i],
      vcpu: batch.vcpu[i],
      dma: (batch.flags[i] & 1) !== 0,
      data: batch.data.subarray(offset, offset + n),
    };
    offset += n;
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const v1 = loadApi(opts.proto);
  const creds = grpc.credentials.createInsecure();
  const vms = new v1.VmService(opts.target, creds);
  const memory = new v1.MemoryService(opts.target, creds);
  const tracking = new v1.TrackingService(opts.target, creds);
  const watch = new v1.WatchService(opts.target, creds);
  const md = new grpc.Metadata();
  if (opts.token) md.set('authorization', `Bearer ${opts.token}`);
  const timer = setTimeout(() => {
    console.error(`gave up after ${opts.timeout} s`);
    process.exit(2);
  }, opts.timeout * 1000);

  const vm = opts.vm;
  const base = 0x100; // first gfn of the memslot
  await unary(vms, 'CreateVm', { name: vm }, md);
  console.log(`created VM ${vm}`);
  try {
    await unary(memory, 'SetMemoryRegion', { vm, slot: 0, base_gfn: base, npages: 16 }, md);
    const tracked = await unary(tracking, 'AddTracking', { vm, gfns: [base, base + 1] }, md);
    console.log(`tracking ${tracked.tracked_gfns} gfns`);

    let registered;
    let failed;
    const isRegistered = new Promise((resolve, reject) => {
      registered = resolve;
      failed = reject;
    });
    const stream = watch.Watch({ vm, max_batch_delay_ms: 0 }, md);
    const events = [];
    const done = new Promise((resolve, reject) => {
      stream.on('data', (msg) => {
        if (msg.kind === 'registered') {
          console.log(`registered notifier ${msg.registered.notifier_id}`);
          registered();
        } else if (msg.kind === 'events') {
          for (const ev of eventsOf(msg.events)) {
            events.push(ev);
            console.log(
              `event seq=${ev.seq} gpa=0x${ev.gpa.toString(16)} length=${ev.length}` +
                ` vcpu=${ev.vcpu} data=${ev.data.toString('hex')}`,
            );
          }
          if (events.length >= opts.writes) resolve();
        } else if (msg.kind === 'gap') {
          console.log(`gap: lost ${msg.gap.count} events (${msg.gap.reason})`);
        }
      });
      stream.on('error', (err) => {
        if (err.code === grpc.status.CANCELLED) return; // our own cancel, when done
        failed(err);
        reject(err);
      });
    });
    done.catch(() => {}); // awaited below; until then a failure surfaces through isRegistered
    await isRegistered; // events of writes made from now on reach this stream

    // Writes alternate between the two tracked pages; each 8-byte store is one event.
    for (let i = 0; i < opts.writes; i++) {
      const gfn = base + (i % 2);
      const gpa = gfn * 4096 + 8 * i;
      await unary(memory, 'WriteGuest', { vm, vcpu: 0, gpa, data: u64le(0x1000 + i) }, md);
    }
    await done;
    stream.cancel();

    const back = await unary(memory, 'ReadGuest', { vm, gpa: base * 4096, length: 8 }, md);
    console.log(`read back gpa 0x${(base * 4096).toString(16)}: ${back.data.toString('hex')}`);
    console.log(`done: ${events.length} events for ${opts.writes} writes`);
  } finally {
    await unary(vms, 'DeleteVm', { vm }, md);
    console.log(`deleted VM ${vm}`);
    clearTimeout(timer);
    for (const c of [vms, memory, tracking, watch]) c.close();
  }
}

main().catch((err) => {
  // A gRPC error has a status code and the daemon's message saying what to change.
  const code = err.code !== undefined ? ` (${grpc.status[err.code]})` : '';
  console.error(`error${code}: ${err.details || err.message}`);
  process.exit(1);
});
