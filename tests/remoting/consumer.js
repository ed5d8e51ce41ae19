'use strict';
// One ali-ons push consumer: subscribes opts.topic with opts.expression, prints
// {"event":"rebalanced"} once it holds queues and {"event":"message", ...} per message it is handed.
// A message whose body is in opts.failBodies is answered with ACTION_RETRY while its
// reconsumeTimes < opts.failTimes (default 1). Exits after opts.expect messages (closing the consumer
// cleanly), or when stdin closes.

const { Consumer } = require('ali-ons');
const { options, emit, fail } = require('./common');

(async () => {
  const { opts, base } = options();
  const consumer = new Consumer(Object.assign(base, {
    consumerGroup: opts.group,
    isBroadcast: !!opts.broadcast,
    instanceName: opts.instanceName || undefined,
    rebalanceInterval: opts.rebalanceInterval || 1000,
    persistConsumerOffsetInterval: 500,
    maxReconsumeTimes: opts.maxReconsumeTimes === undefined ? 16 : opts.maxReconsumeTimes,
    pullBatchSize: 32,
  }));
  consumer.on('error', err => console.error('[consumer error]', err.message));
  const failBodies = opts.failBodies || [];
  const failTimes = opts.failTimes === undefined ? 1 : opts.failTimes;
  let seen = 0;
  let closing = false;
  const close = async code => {
    if (closing) return;
    closing = true;
    try { await consumer.close(); } catch (err) { console.error('[close]', err.message); }
    emit({ event: 'closed', seen });
    process.exit(code);
  };
  consumer.on(`topic_${opts.topic}_queue_changed`, () => emit({ event: 'rebalanced', queues: countQueues() }));
  function countQueues() {
    let n = 0;
    for (const item of consumer.processQueueTable.values()) {
      if (item.messageQueue.topic === opts.topic) n++;
    }
    return n;
  }
  consumer.subscribe(opts.topic, opts.expression || '*', async msg => {
    const body = msg.body ? msg.body.toString() : '';
    const retry = failBodies.includes(body) && msg.reconsumeTimes < failTimes;
    emit({
      event: 'message', msgId: msg.msgId, topic: msg.topic, tags: msg.tags, keys: msg.keys,
      body, reconsumeTimes: msg.reconsumeTimes, queueId: msg.queueId, queueOffset: msg.queueOffset,
      retryTopic: msg.retryTopic || null, retrying: retry, bodyLength: msg.body ? msg.body.length : 0,
      startDeliverTime: msg.properties.__STARTDELIVERTIME || null, storeTimestamp: msg.storeTimestamp,
    });
    if (retry) return Consumer.ACTION_RETRY;
    seen++;
    if (opts.expect && seen >= opts.expect) setImmediate(() => close(0));
  });
  await consumer.ready();
  emit({ event: 'ready' });
  process.stdin.on('end', () => close(0));
  process.stdin.resume();
})().catch(fail);
