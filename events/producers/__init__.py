"""Producers: turn logged requests, data sources, schemas and schedules into signal events.

``performance``, ``volume`` and ``upstream`` are plain functions over DataFrames and files (plus
one reader of the router's streams that takes a Redis client); ``schedule`` holds the
celery-redbeat entries and the Celery task that publishes ``schedule.tick``.
"""
