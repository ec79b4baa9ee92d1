-- description = "Orders created in a range of UTC days: how many, how many cancelled, units and revenue of the others, average order value."
-- read_models = ["order_summary"]
--
-- [params.start_date]
-- description = "First UTC day of the range (YYYY-MM-DD)."
--
-- [params.end_date]
-- description = "Last UTC day of the range, included (YYYY-MM-DD)."
SELECT count() AS orders,
       countIf(status = 'CANCELLED') AS cancelled,
       sumIf(units, status != 'CANCELLED') AS units,
       sumIf(total, status != 'CANCELLED') AS revenue,
       if(orders = cancelled, toDecimal128(0, 2),
          toDecimal128(revenue / (orders - cancelled), 2)) AS average_order_value
FROM read_models.order_summary
WHERE toDate(created_at) BETWEEN {start_date:Date} AND {end_date:Date}
