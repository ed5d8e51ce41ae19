"""Runs the Eclipse Paho MQTT 3.1.1 interoperability suite (paho.mqtt.testing,
interoperability/client_test.py) against a broker, every case, and exits non-zero unless all pass.

The suite is not published on any package registry, so it is not part of this repository or of
CI: point this at a checkout of it.

    python paho_interop.py SUITE_DIR HOST PORT [unittest args, e.g. -k test_retained]

SUITE_DIR is the checkout's `interoperability` directory. The broker must refuse subscriptions to
`test/nosubscribe` (SUBACK 0x80), as the suite's subscribe-failure case expects; for Wharf that
is `[mqtt] deny_subscribe = ["test/nosubscribe"]` in open mode.
"""

import importlib
import logging
import sys
import unittest


def main():
    if len(sys.argv) < 4:
        print(__doc__)
        sys.exit(2)
    suite_dir, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.path.insert(0, suite_dir)
    ct = importlib.import_module("client_test")
    # client_test.py sets these in its __main__ block, which parses its own options and then
    # hands sys.argv to unittest (where -h means help); set them here instead.
    ct.host, ct.port = host, port
    ct.topics = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
    ct.wildtopics = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
    ct.nosubscribe_topics = ("test/nosubscribe",)
    logging.getLogger().setLevel(logging.ERROR)
    unittest.main(module=ct, argv=["client_test", "-v"] + sys.argv[4:])


if __name__ == "__main__":
    main()
