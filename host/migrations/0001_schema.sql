-- Wharf's PostgreSQL schema, format 1.
--
-- Forward-only: a later format is a new numbered file beside this one, never an edit of it
-- (sqlx checks every applied migration's checksum at start-up). Text keys use the "C"
-- collation so listings sort bytewise, as the embedded store sorts them.

-- One row: this database's node id (the 16 node bits of every MessageId it hands out) and
-- the format of the message rows it was created with.
CREATE TABLE wharf_cluster (
    id         int PRIMARY KEY CHECK (id = 1),
    node       int NOT NULL CHECK (node BETWEEN 0 AND 65535),
    created_ms bigint NOT NULL
);
INSERT INTO wharf_cluster (id, node, created_ms)
VALUES (1, floor(random() * 65536)::int, (extract(epoch FROM clock_timestamp()) * 1000)::bigint);

-- Durable metadata (topics, groups, plugin registry, ...) with versions for compare-and-set.
CREATE TABLE wharf_meta (
    namespace text COLLATE "C" NOT NULL,
    key       text COLLATE "C" NOT NULL,
    value     bytea NOT NULL,
    version   bigint NOT NULL,
    PRIMARY KEY (namespace, key)
);

-- One row per consume queue. Appenders lock the row while they take offsets, so a queue's
-- offsets are gapless and commit (become visible) in offset order.
CREATE TABLE wharf_queue (
    topic      text COLLATE "C" NOT NULL,
    queue_id   int NOT NULL,
    min_offset bigint NOT NULL DEFAULT 0,
    max_offset bigint NOT NULL,
    PRIMARY KEY (topic, queue_id)
);

-- Log positions: unique across every host on this database, never reused (not even after
-- retention), so a MessageId's position finds its row.
CREATE SEQUENCE wharf_position AS bigint MINVALUE 0 START 0;

-- Messages, partitioned by time so retention drops whole partitions. part_ms is the store
-- time, or for a timer message the time it was revealed (the reveal moves the row into the
-- current partition, as the embedded store copies a revealed timer to the log head), so a
-- queue never loses a revealed message to the retention of an older partition.
CREATE TABLE wharf_message (
    position        bigint NOT NULL,
    part_ms         bigint NOT NULL,
    stored_ms       bigint NOT NULL,
    topic           text COLLATE "C" NOT NULL,
    queue_id        int NOT NULL,
    queue_offset    bigint,
    tag             text,
    tag_hash        int NOT NULL,
    keys            text[] NOT NULL,
    properties      bytea NOT NULL,
    body            bytea NOT NULL,
    born_ms         bigint NOT NULL,
    deliver_at_ms   bigint,
    reconsume_times int NOT NULL,
    flag            int NOT NULL,
    sys_flag        int NOT NULL,
    born_host       text,
    store_host      text,
    format          smallint NOT NULL
) PARTITION BY RANGE (part_ms);

CREATE INDEX wharf_message_queue ON wharf_message (topic, queue_id, queue_offset)
    WHERE queue_offset IS NOT NULL;
CREATE INDEX wharf_message_position ON wharf_message (position);
CREATE INDEX wharf_message_time ON wharf_message (topic, stored_ms, position);
CREATE INDEX wharf_message_keys ON wharf_message USING gin (keys) WHERE keys <> '{}';
CREATE INDEX wharf_message_timers ON wharf_message (deliver_at_ms, position)
    WHERE queue_offset IS NULL;
CREATE INDEX wharf_message_part ON wharf_message USING brin (part_ms);

-- Consumer offsets: the next offset to consume, per group and queue.
CREATE TABLE wharf_offset (
    grp         text COLLATE "C" NOT NULL,
    topic       text COLLATE "C" NOT NULL,
    queue_id    int NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (grp, topic, queue_id)
);

-- Members of consumer groups; a row is live while the store's now < expires_at_ms.
CREATE TABLE wharf_member (
    grp           text COLLATE "C" NOT NULL,
    member_id     text COLLATE "C" NOT NULL,
    kind          smallint NOT NULL,
    data          bytea NOT NULL,
    expires_at_ms bigint NOT NULL,
    PRIMARY KEY (grp, member_id)
);

-- Queue leases. A row is never deleted: after a release (holder NULL) or expiry its epoch
-- stays the queue's fence until the next holder takes it with epoch + 1.
CREATE TABLE wharf_lease (
    grp           text COLLATE "C" NOT NULL,
    topic         text COLLATE "C" NOT NULL,
    queue_id      int NOT NULL,
    holder        text COLLATE "C",
    epoch         bigint NOT NULL,
    expires_at_ms bigint NOT NULL,
    PRIMARY KEY (grp, topic, queue_id)
);
