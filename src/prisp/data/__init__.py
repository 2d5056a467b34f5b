"""LaMP data: tasks, loading and validation, few-shot protocol, prompts, downloads."""
