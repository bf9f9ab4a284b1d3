"""Closing the loop: monitor live traffic against the champion's reference, alert on changes of state,
collect feedback and labels from people, and turn them into the next data version.

- `check.py`: one `kftune monitor` check (drift tests on the traffic, alert rules, MLflow run, report)
- `rules.py`: the alert rules, pure functions of a window of traffic, and their state machine
- `sinks.py`: where alerts go (log, webhook, MLflow)
- `feedback.py`: corrections stored beside the request log, and live quality with intervals
- `labels.py`: the labelling queue and the import of labels as a new data version
- `report.py`: the Markdown + PNG report of a check
"""
