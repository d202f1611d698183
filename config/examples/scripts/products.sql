-- The table config/examples/load-products.toml fills. No unique key: Hopper's record of the
-- applied chunks (hopper.applied_chunks) is what keeps each row once.
DROP TABLE IF EXISTS products;
CREATE TABLE products (
    id    bigint        NOT NULL,
    name  text          NOT NULL,
    price numeric(10,2) NOT NULL CHECK (price >= 0)
);
-- Forget earlier loads of the example (their applied chunks would be taken as done).
DO $$ BEGIN
    IF to_regclass('hopper.applied_chunks') IS NOT NULL THEN
        DELETE FROM hopper.applied_chunks WHERE job = 'load-products';
    END IF;
END $$;
