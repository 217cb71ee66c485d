"""Create the topics Loopwise reads and writes (Faust creates only its internal ones)."""

from __future__ import annotations

import contextlib
import logging

from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from loopwise import kafka_clients
from loopwise.config import Settings

log = logging.getLogger("loopwise.topics")


def ensure_topics(settings: Settings) -> None:
    """Create the events, dead-letter and propensity-log topics if they do not exist.

    The events topic is keyed by user_id and has ``topic_partitions`` partitions;
    existing topics are left as they are.
    """
    admin = kafka_clients.admin(settings, client_id="loopwise-admin")
    try:
        existing = set(admin.list_topics())
        wanted = [settings.events_topic, settings.deadletter_topic, settings.propensity_log_topic]
        new = [
            NewTopic(name, num_partitions=settings.topic_partitions, replication_factor=1)
            for name in wanted
            if name not in existing
        ]
        if new:
            # Another process may create one between list and create: fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
            log.info("created topics %s", ", ".join(t.name for t in new))
    finally:
        admin.close()
