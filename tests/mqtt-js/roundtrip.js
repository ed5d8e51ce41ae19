// MQTT.js round trip the wharf e2e tests (tests/e2e/mqtt_clients.rs) run against the gateway.
//
//   node roundtrip.js URL [CAFILE]
//
// URL is mqtt://, mqtts://, ws:// or wss:// (with the WebSocket path). A subscriber subscribes at
// QoS 1 and QoS 0 to two topics, a publisher sends three messages to each, and every one must
// arrive in order at its QoS. Prints "ok ..." and exits 0, or "FAIL ..." and exits 1.
'use strict';

const fs = require('fs');
const crypto = require('crypto');
const mqtt = require('mqtt');

const [url, cafile] = process.argv.slice(2);
if (!url) {
  console.error('usage: node roundtrip.js URL [CAFILE]');
  process.exit(2);
}
const TIMEOUT_MS = 20000;
const options = { protocolVersion: 4, reconnectPeriod: 0, connectTimeout: TIMEOUT_MS };
if (cafile) {
  options.ca = fs.readFileSync(cafile);
}

function connect(clientId) {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(url, { ...options, clientId });
    c.once('connect', () => resolve(c));
    c.once('error', reject);
  });
}

function withTimeout(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), TIMEOUT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function main() {
  const id = crypto.randomBytes(6).toString('hex');
  const topics = { [`js/${id}/q1`]: 1, [`js/${id}/q0`]: 0 };
  const sub = await withTimeout(connect(`js-sub-${id}`), 'subscriber CONNACK');
  const request = Object.fromEntries(Object.entries(topics).map(([t, qos]) => [t, { qos }]));
  const granted = await withTimeout(sub.subscribeAsync(request), 'SUBACK');
  for (const g of granted) {
    if (g.qos !== topics[g.topic]) {
      throw new Error(`subscribed ${g.topic} at QoS ${topics[g.topic]}, granted ${g.qos}`);
    }
  }
  const want = [];
  for (const [topic, qos] of Object.entries(topics)) {
    for (let i = 0; i < 3; i++) {
      want.push({ topic, qos, payload: `${topic} #${i}` });
    }
  }
  const got = [];
  const all = new Promise((resolve) => {
    sub.on('message', (topic, payload, packet) => {
      got.push({ topic, qos: packet.qos, payload: payload.toString() });
      if (got.length === want.length) {
        resolve();
      }
    });
  });

  const pub = await withTimeout(connect(`js-pub-${id}`), 'publisher CONNACK');
  for (const m of want) {
    await withTimeout(pub.publishAsync(m.topic, m.payload, { qos: m.qos }), `publish ${m.payload}`);
  }
  await withTimeout(all, `all ${want.length} messages (got ${got.length})`);

  // Per topic, order is the publisher's order (topics may interleave).
  for (const topic of Object.keys(topics)) {
    const w = want.filter((m) => m.topic === topic);
    const g = got.filter((m) => m.topic === topic);
    if (JSON.stringify(w) !== JSON.stringify(g)) {
      throw new Error(`on ${topic} expected ${JSON.stringify(w)}, got ${JSON.stringify(g)}`);
    }
  }
  await pub.endAsync();
  await sub.endAsync();
  console.log(`ok mqtt.js ${url}: ${got.length} messages at QoS 0 and 1`);
}

main().then(
  () => process.exit(0),
  (e) => {
    console.log(`FAIL mqtt.js ${url}: ${e && e.message ? e.message : e}`);
    process.exit(1);
  },
);
