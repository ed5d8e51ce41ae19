'use strict';
// Sends opts.messages ([{topic, tags, keys, body, props, startDeliverTime, delayLevel}]) with one ali-ons
// producer and prints {"event":"sent", msgId, queueId, queueOffset, sendStatus} per message.

const { Producer, Message } = require('ali-ons');
const { options, emit, fail } = require('./common');

(async () => {
  const { opts, base } = options();
  const producer = new Producer(Object.assign(base, { producerGroup: opts.producerGroup || 'PID_wharf_test' }));
  producer.on('error', err => console.error('[producer error]', err.message));
  await producer.ready();
  for (const m of opts.messages) {
    const msg = new Message(m.topic, m.tags === undefined ? null : m.tags, m.body);
    if (m.keys) msg.keys = m.keys;
    if (m.startDeliverTime) msg.setStartDeliverTime(m.startDeliverTime);
    if (m.delayLevel) msg.delayTimeLevel = m.delayLevel;
    for (const [k, v] of Object.entries(m.props || {})) msg.properties[k] = v;
    try {
      const r = await producer.send(msg);
      emit({ event: 'sent', msgId: r.msgId, queueId: r.messageQueue.queueId, queueOffset: r.queueOffset, sendStatus: r.sendStatus });
    } catch (err) {
      emit({ event: 'send_failed', message: err.message, code: err.code });
    }
  }
  await producer.close();
  emit({ event: 'done' });
  process.exit(0);
})().catch(fail);
