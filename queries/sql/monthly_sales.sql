-- description = "Sales per UTC month in a range: orders, revenue, average order value (cancelled orders excluded)."
-- read_models = ["monthly_sales"]
--
-- [params.start_date]
-- description = "A day in the first month (YYYY-MM-DD)."
--
-- [params.end_date]
-- description = "A day in the last month, included (YYYY-MM-DD)."
SELECT month, orders, revenue, average_order_value
FROM read_models.monthly_sales
WHERE month BETWEEN toStartOfMonth({start_date:Date}) AND {end_date:Date}
ORDER BY month
