-- a global aggregate: one row
SELECT count(*) AS orders, sum(quantity) AS items, bool_or(quantity > 3) AS any_bulk
FROM orders
