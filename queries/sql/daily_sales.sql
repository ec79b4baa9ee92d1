-- description = "Sales per UTC day in a range: orders, revenue, average order value (cancelled orders excluded)."
-- read_models = ["daily_sales"]
--
-- [params.start_date]
-- description = "First UTC day (YYYY-MM-DD)."
--
-- [params.end_date]
-- description = "Last UTC day, included (YYYY-MM-DD)."
SELECT day, orders, revenue, average_order_value
FROM read_models.daily_sales
WHERE day BETWEEN {start_date:Date} AND {end_date:Date}
ORDER BY day
