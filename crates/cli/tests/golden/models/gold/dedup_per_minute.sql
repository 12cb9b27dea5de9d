-- windows over deduplicated rows (event time inherited from silver.orders)
SELECT date_bin(INTERVAL '1 minute', ts) AS window_start, count(*) AS orders
FROM silver.orders
GROUP BY date_bin(INTERVAL '1 minute', ts)
