-- stream ⋈ stream, then GROUP BY
SELECT o.customer_id, count(*) AS payments, sum(p.amount) AS paid
FROM orders o
JOIN payments p
  ON p.order_id = o.order_id AND o.ts <= p.ts AND p.ts < o.ts + INTERVAL '1 minute'
GROUP BY o.customer_id
