"""The Celery app the broker tests start workers from (``-A celery_testapp``).

Configured from the environment, so one module serves both kinds of worker:
``PIDBOX_CELERY_BROKER`` (URL), ``PIDBOX_CELERY_CONTROL`` (``pidbox`` for
``control='pidbox.contrib.celery:Control'``, ``stock`` for Celery's own) and
``PIDBOX_CELERY_NAMESPACE`` (the control exchange, unique per test run).
"""

from __future__ import annotations

import os

from celery import Celery
from celery.worker.control import inspect_command

PIDBOX_CONTROL = 'pidbox.contrib.celery:Control'


def make_app(broker, control='pidbox', namespace='celery'):
    app = Celery('celery_testapp', broker=broker,
                 control=PIDBOX_CONTROL if control == 'pidbox' else None,
                 set_as_current=False)
    app.conf.update(
        control_exchange=namespace,
        task_default_queue=f'{namespace}.tasks',
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name='celery_testapp.add', shared=False)(add)
    return app


def add(x, y):
    return x + y


@inspect_command()
def mailbox_impl(state):
    """Which mailbox and node classes this worker's remote control runs on."""
    control = state.consumer.controller.app.control
    node = control.mailbox.Node('probe')
    return {'mailbox': type(control.mailbox).__module__,
            'node': type(node).__module__}


app = make_app(os.environ.get('PIDBOX_CELERY_BROKER', 'memory://'),
               os.environ.get('PIDBOX_CELERY_CONTROL', 'pidbox'),
               os.environ.get('PIDBOX_CELERY_NAMESPACE', 'celery'))
