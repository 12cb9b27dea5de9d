-- JSON field access on an untyped topic
SELECT json_get_str(value, 'page') AS page,
       json_get_int(value, 'user') AS user_id,
       json_get_float(value, 'ms') AS ms,
       json_get_str(value, 'ref', 'source') AS source
FROM clicks
WHERE json_get_str(value, 'kind') = 'view'
