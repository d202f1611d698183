-- The tables config/examples/reprice-catalog.toml works on: 100,000 products, 90,000 of them
-- active, and an audit table of the price changes (no unique key: Hopper's record of the
-- applied chunks, hopper.applied_chunks, is what applies each change once).
DROP TABLE IF EXISTS catalog, catalog_repriced;
CREATE TABLE catalog (
    id          bigint  PRIMARY KEY,
    sku         text    NOT NULL,
    price_cents bigint  NOT NULL CHECK (price_cents > 0),
    active      boolean NOT NULL
);
INSERT INTO catalog
SELECT i, 'SKU-' || lpad(i::text, 6, '0'), 100 + (i * 7919) % 50000, i % 10 <> 0
FROM generate_series(1, 100000) AS i;
CREATE TABLE catalog_repriced (
    id        bigint NOT NULL,
    sku       text   NOT NULL,
    old_cents bigint NOT NULL,
    new_cents bigint NOT NULL
);
-- Forget earlier runs of the example (their applied chunks would be taken as done).
DO $$ BEGIN
    IF to_regclass('hopper.applied_chunks') IS NOT NULL THEN
        DELETE FROM hopper.applied_chunks WHERE job = 'reprice-catalog';
    END IF;
END $$;
