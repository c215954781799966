"""The dashboard: Celery events and fleet state kept in a database, pages, a REST API
(Flower's paths included), Prometheus metrics, control actions with an audit log.

Kept apart from the fleet's core: ingest (events in), store (the database adapter),
views (queries shaped for pages and the API), control (actions out), auth, api (HTTP).
"""
