"""What task and node transitions cause: rules bound to transitions, applied in the
transaction that makes the change."""
