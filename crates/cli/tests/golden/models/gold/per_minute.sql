-- tumbling window
SELECT date_bin(INTERVAL '1 minute', ts) AS window_start, region,
       count(*) AS orders, sum(quantity * unit_price) AS revenue
FROM orders
GROUP BY date_bin(INTERVAL '1 minute', ts), region
