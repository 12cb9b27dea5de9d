-- hopping window: 2 minutes every 30 s
SELECT window_start, count(*) AS orders, max(unit_price) AS top
FROM (
  SELECT unnest(hop(ts, INTERVAL '30 seconds', INTERVAL '2 minutes')) AS window_start, unit_price
  FROM orders
)
GROUP BY window_start
