-- description = "Orders created in a range of UTC days: how many, how many cancelled, units and revenue of the others, average order value."
-- read_models = ["daily_order_statistics"]
--
-- [params.start_date]
-- description = "First UTC day of the range (YYYY-MM-DD)."
--
-- [params.end_date]
-- description = "Last UTC day of the range, included (YYYY-MM-DD)."
SELECT toUInt64(sum(s.orders)) AS orders,
       toUInt64(sum(s.cancelled)) AS cancelled,
       sum(s.units) AS units,
       sum(s.revenue) AS revenue,
       if(orders = cancelled, toDecimal128(0, 2),
          toDecimal128(revenue / (orders - cancelled), 2)) AS average_order_value
FROM read_models.daily_order_statistics AS s
WHERE s.day BETWEEN {start_date:Date} AND {end_date:Date}
