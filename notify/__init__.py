"""Result events pushed to subscribers' HTTP endpoints, signed, retried until acknowledged."""
