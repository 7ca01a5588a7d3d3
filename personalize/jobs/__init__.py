"""Jobs: training jobs in SQL, the Celery queue, worker processes, task-adapter jobs."""
