-- Metadata change stamps: every write of a wharf_meta row takes the next value of one
-- sequence (no row lock shared between writers), so a host sees that another host changed a
-- namespace when the namespace's (row count, newest stamp) moves. Deletes move the count,
-- creates and updates the newest stamp.
CREATE SEQUENCE wharf_meta_stamp;
ALTER TABLE wharf_meta ADD COLUMN stamp bigint NOT NULL DEFAULT nextval('wharf_meta_stamp');
CREATE INDEX wharf_meta_by_stamp ON wharf_meta (namespace, stamp);
