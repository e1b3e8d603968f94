"""Triggers: schedules, webhooks, queue messages and inbound email that start runs."""
