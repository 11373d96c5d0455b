"""The web console: hand-written pages served by the API that speak only its JSON API."""
