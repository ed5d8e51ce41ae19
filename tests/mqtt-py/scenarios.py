"""paho-mqtt scenarios the wharf e2e tests (tests/e2e/mqtt_clients.rs) run against the gateway.

Usage: python scenarios.py SCENARIO --host H --port P [--transport tcp|websockets]
       [--ws-path /mqtt] [--cafile ca.pem] [--prefix topic/prefix]

Scenarios:
  roundtrip      QoS 1 and QoS 2: a subscriber at each QoS receives every payload of a publisher,
                 in order, at the granted QoS, each publish acknowledged (PUBACK / PUBCOMP).
  offline-queue  clean_session=False: subscribe at QoS 1, disconnect, messages are published while
                 the client is away, the reconnect finds its session (session present) and gets
                 every queued message.

Prints one line per check and exits 0 when every check passed, 1 (with the reason) otherwise.
"""

import argparse
import queue
import sys
import threading
import uuid

import paho.mqtt.client as mqtt

TIMEOUT = 20.0


class Failure(Exception):
    """A check that did not hold."""


class Client:
    """A paho client on its own network thread, with its events turned into queues."""

    def __init__(self, args, client_id, clean_session=True):
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            transport=args.transport,
        )
        if args.transport == "websockets":
            self.c.ws_set_options(path=args.ws_path)
        if args.cafile:
            self.c.tls_set(ca_certs=args.cafile)
        self.args = args
        self.connack = queue.Queue()
        self.subacks = queue.Queue()
        self.messages = queue.Queue()
        self.disconnected = threading.Event()
        self.c.on_connect = lambda c, u, flags, rc, p: self.connack.put((flags, rc))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put((mid, rcs))
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.c.on_disconnect = lambda c, u, flags, rc, p: self.disconnected.set()

    def connect(self):
        """Connects and returns the CONNACK's session-present flag; fails on a refusal."""
        self.c.connect(self.args.host, self.args.port, keepalive=30)
        self.c.loop_start()
        try:
            flags, rc = self.connack.get(timeout=TIMEOUT)
        except queue.Empty:
            raise Failure("no CONNACK within %ss" % TIMEOUT)
        if rc.is_failure:
            raise Failure("CONNACK refused: %s" % rc)
        return flags.session_present

    def subscribe(self, topic, qos):
        """Subscribes and returns the granted QoS."""
        result, mid = self.c.subscribe(topic, qos)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise Failure("subscribe %s: %s" % (topic, mqtt.error_string(result)))
        try:
            got_mid, rcs = self.subacks.get(timeout=TIMEOUT)
        except queue.Empty:
            raise Failure("no SUBACK for %s" % topic)
        if got_mid != mid:
            raise Failure("SUBACK for packet id %s, expected %s" % (got_mid, mid))
        granted = rcs[0]
        if granted.is_failure:
            raise Failure("SUBACK refused %s: %s" % (topic, granted))
        return granted.value

    def publish(self, topic, payload, qos):
        """Publishes and waits until the broker acknowledged it (PUBACK / PUBCOMP)."""
        info = self.c.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=TIMEOUT)
        if not info.is_published():
            raise Failure("publish to %s at QoS %d was not acknowledged" % (topic, qos))

    def expect(self, topic, payloads, qos):
        """Receives exactly these payloads on this topic, in order, each at this QoS."""
        for want in payloads:
            try:
                msg = self.messages.get(timeout=TIMEOUT)
            except queue.Empty:
                raise Failure("waiting for %r on %s: nothing arrived" % (want, topic))
            if msg.topic != topic or msg.payload != want or msg.qos != qos:
                raise Failure(
                    "got %r on %s at QoS %d, expected %r on %s at QoS %d"
                    % (msg.payload, msg.topic, msg.qos, want, topic, qos)
                )

    def close(self):
        """Sends DISCONNECT and stops the network thread."""
        self.c.disconnect()
        self.disconnected.wait(TIMEOUT)
        self.c.loop_stop()


def unique(prefix):
    return "%s/%s" % (prefix, uuid.uuid4().hex[:12])


def roundtrip(args):
    for qos in (1, 2):
        topic = unique(args.prefix)
        sub = Client(args, "py-sub-%d-%s" % (qos, uuid.uuid4().hex[:8]))
        pub = Client(args, "py-pub-%d-%s" % (qos, uuid.uuid4().hex[:8]))
        sub.connect()
        granted = sub.subscribe(topic, qos)
        if granted != qos:
            raise Failure("subscribed at QoS %d, granted %d" % (qos, granted))
        pub.connect()
        payloads = [("qos%d message %d" % (qos, i)).encode() for i in range(5)]
        for p in payloads:
            pub.publish(topic, p, qos)
        sub.expect(topic, payloads, qos)
        pub.close()
        sub.close()
        print("ok roundtrip qos=%d transport=%s tls=%s" % (qos, args.transport, bool(args.cafile)))


def offline_queue(args):
    topic = unique(args.prefix)
    client_id = "py-persistent-%s" % uuid.uuid4().hex[:8]
    away = Client(args, client_id, clean_session=False)
    present = away.connect()
    if present:
        raise Failure("a new client id reported session present")
    away.subscribe(topic, 1)
    away.close()

    pub = Client(args, "py-pub-%s" % uuid.uuid4().hex[:8])
    pub.connect()
    payloads = [("queued %d" % i).encode() for i in range(3)]
    for p in payloads:
        pub.publish(topic, p, 1)
    pub.close()

    back = Client(args, client_id, clean_session=False)
    present = back.connect()
    if not present:
        raise Failure("reconnect with clean_session=False did not report session present")
    back.expect(topic, payloads, 1)
    back.close()
    print("ok offline-queue transport=%s tls=%s" % (args.transport, bool(args.cafile)))


SCENARIOS = {"roundtrip": roundtrip, "offline-queue": offline_queue}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--transport", choices=["tcp", "websockets"], default="tcp")
    ap.add_argument("--ws-path", default="/mqtt")
    ap.add_argument("--cafile")
    ap.add_argument("--prefix", default="py")
    args = ap.parse_args()
    try:
        SCENARIOS[args.scenario](args)
    except Failure as e:
        print("FAIL %s: %s" % (args.scenario, e))
        sys.exit(1)


if __name__ == "__main__":
    main()
