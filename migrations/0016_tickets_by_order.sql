-- An order's tickets were found by scanning every ticket: showing an order, refunding it, the
-- support lookup and deleting an event's orders each read the whole table (seen as one
-- sequential scan per deleted order after `bench-checkout`). Index them by order.
CREATE INDEX tickets_order ON tickets (order_id);
