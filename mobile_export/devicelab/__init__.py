"""Device-test runner: plans, devices, the benchmark harness contract, results and reports.

::

    plan.yaml ──► runner ──► device (host | android | ios | devicefarm) ──► harness on the device
                    │                                                          │
                    ▼                                                          ▼
             results.jsonl  ◄──────── one record per measurement ◄──── harness results file
                    │
                    ▼
             report: summary.json, report.md, report.html (+ baseline comparison)

Modules: :mod:`plan` (schema and loading), :mod:`bundles` (bundles to test, prompts),
:mod:`harness` (the contract every on-device harness follows, and the host harness),
:mod:`devices` (one small interface, one module per way of reaching a phone),
:mod:`results` (versioned JSONL records, resume), :mod:`runner` and :mod:`progress`
(orchestration, progress, summary), :mod:`report`, :mod:`html` and :mod:`pytorch_db` (summaries,
plots, regressions, database rows; :mod:`report_format` is how both reports show a figure).
"""
