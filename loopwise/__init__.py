"""Loopwise: a streaming personalization engine."""
