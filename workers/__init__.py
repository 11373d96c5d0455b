"""genserve workers: the Celery app, thin tasks, and the engines that run models."""
