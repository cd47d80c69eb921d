// A consumer nobody at Tidemark wrote the client of: kafkajs, in a consumer
// group with committed offsets. It prints each record it reads as one JSON
// line (topic, partition, offset, key, value or null, headers), committing
// its offset before printing it, and stops after --max records, or once no
// record came for --idle-ms after the group was joined.
//
//   node consume.js --brokers 127.0.0.1:9092 --group g --topics a,b --max 100 --idle-ms 3000
const { Kafka, logLevel } = require('kafkajs');

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const max = Number(args.max || Infinity);
const idleMs = Number(args['idle-ms'] || 3000);

const kafka = new Kafka({ clientId: 'tidemark-kafkajs-check', brokers: args.brokers.split(','), logLevel: logLevel.ERROR });
const consumer = kafka.consumer({ groupId: args.group, sessionTimeout: 10000, heartbeatInterval: 500 });

let seen = 0;
let last = Date.now();
let joined = false;
let stopping = false;

async function stop(code) {
  if (stopping) return;
  stopping = true;
  try { await consumer.disconnect(); } catch (e) { /* exiting anyway */ }
  process.exit(code);
}

async function main() {
  consumer.on(consumer.events.GROUP_JOIN, () => { joined = true; last = Date.now(); });
  await consumer.connect();
  for (const topic of args.topics.split(',')) await consumer.subscribe({ topic, fromBeginning: true });
  await consumer.run({
    autoCommit: false,
    eachMessage: async ({ topic, partition, message }) => {
      if (stopping || seen >= max) return;
      await consumer.commitOffsets([{ topic, partition, offset: (BigInt(message.offset) + 1n).toString() }]);
      const headers = {};
      for (const [k, v] of Object.entries(message.headers || {})) headers[k] = v === undefined || v === null ? null : v.toString();
      process.stdout.write(JSON.stringify({
        topic, partition, offset: Number(message.offset),
        key: message.key === null ? null : message.key.toString(),
        value: message.value === null ? null : message.value.toString(),
        headers,
      }) + '\n');
      seen++;
      last = Date.now();
      if (seen >= max) setImmediate(() => stop(0));
    },
  });
  setInterval(() => { if (joined && Date.now() - last > idleMs) stop(0); }, 100);
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e) + '\n'); process.exit(1); });
