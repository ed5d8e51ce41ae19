-- Metadata deletes leave a row here, stamped from the same sequence, so every committed
-- change moves a namespace's print, which is now (row count, sum of stamps) of both tables.
-- With (count, newest stamp) of wharf_meta alone, a key created on one host and deleted on
-- another between two polls left the print as it was, and a stamp taken early but committed
-- after a later one could hide behind it; a sum moves with each change whatever the commit
-- order. The hourly retention pass keeps each namespace's newest row and removes the rest, so
-- the table stays small (that move of the print costs each host one reload).
CREATE TABLE wharf_meta_deleted (
    namespace text COLLATE "C" NOT NULL,
    stamp     bigint NOT NULL DEFAULT nextval('wharf_meta_stamp'),
    PRIMARY KEY (namespace, stamp)
);
