// Read one VM's exported pagetrack records from NATS JetStream and check them.
//
//   node consumer.mjs nats://127.0.0.1:4222 'pagetrack.<tenant>.<vm>.>' [UNTIL_SEQ]
//
// Prints one line per message (events, gaps, regions), in the same form as the Python
// example, and stops once UNTIL_SEQ is covered (or after 5 s without a message). It
// reads through an ordered consumer: nothing is stored on the server, each run starts
// from the stream's first message. EventBatch payloads are decoded with protobufjs from
// pagetrack's .proto file (PAGETRACK_PROTO, default: this repository's copy).
import { connect } from "nats";
import protobuf from "protobufjs";
import { fileURLToPath } from "node:url";
import path from "node:path";

const [url, subject, untilArg] = process.argv.slice(2);
if (!url || !subject) {
  console.error("usage: node consumer.mjs NATS_URL SUBJECT [UNTIL_SEQ]");
  process.exit(2);
}
const until = untilArg ? Number(untilArg) : Infinity;
const here = path.dirname(fileURLToPath(import.meta.url));
const protoPath = process.env.PAGETRACK_PROTO
  ?? path.join(here, "../../../proto/pagetrack/v1/pagetrack.proto");
const EventBatch = protobuf.loadSync(protoPath).lookupType("pagetrack.v1.EventBatch");
const num = (x) => (typeof x === "number" ? x : x.toNumber()); // fixed64 may be a Long

const nc = await connect({ servers: url });
const js = nc.jetstream();
const consumer = await js.consumers.get(process.env.PAGETRACK_STREAM ?? "PAGETRACK", {
  filterSubjects: [subject],
});
let nextSeq = null;
let idle;
const messages = await consumer.consume();
const resetIdle = () => {
  clearTimeout(idle);
  idle = setTimeout(() => messages.stop(), 5000);
};
resetIdle();
for await (const m of messages) {
  resetIdle();
  const h = (name) => m.headers.get(name);
  const kind = h("Pagetrack-Kind");
  const vm = h("Pagetrack-Vm");
  const first = Number(h("Pagetrack-First-Seq"));
  const last = Number(h("Pagetrack-Last-Seq"));
  if (kind === "events") {
    let seqs;
    if (h("Content-Type").startsWith("application/x-protobuf")) {
      seqs = EventBatch.decode(m.data).seq.map(num);
    } else {
      seqs = new TextDecoder().decode(m.data).trim().split("\n").map((l) => JSON.parse(l).seq);
    }
    if (seqs[0] !== first || seqs.at(-1) !== last || seqs.length !== last - first + 1) {
      throw new Error(`batch ${first}..${last} holds other seqs`);
    }
    console.log(`${vm} events ${first}..${last} (${seqs.length} events)`);
  } else if (kind === "gaps") {
    console.log(`${vm} gap ${first}..${last} ${h("Pagetrack-Gap-Reason")}`
      + ` (${h("Pagetrack-Count")} events lost)`);
  } else {
    console.log(`${vm} region removed at seq ${h("Pagetrack-At-Seq")}`);
  }
  if (kind !== "regions") {
    if (nextSeq !== null && first !== nextSeq) {
      throw new Error(`${vm}: seq ${first} follows ${nextSeq - 1}`);
    }
    nextSeq = last + 1;
  }
  if (nextSeq !== null && nextSeq > until) break;
}
clearTimeout(idle);
await nc.close();
process.exit(nextSeq === null ? 1 : 0);
