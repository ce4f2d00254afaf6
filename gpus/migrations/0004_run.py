"""One supervised process per row (gpus.Run); reservations will point at runs."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('gpus', '0003_host_worker_instance'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='Run',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('kind', models.CharField(choices=[('train', 'Training'), ('export', 'Export'), ('deploy', 'Deployment')], max_length=8, verbose_name='kind')),
                ('subject_id', models.PositiveIntegerField(help_text='The task, export or deployment id.', verbose_name='subject')),
                ('number', models.PositiveIntegerField(default=1, help_text='1, then 2 for a first resume, …', verbose_name='run')),
                ('label', models.CharField(blank=True, help_text='What the GPU page names.', max_length=255, verbose_name='label')),
                ('status', models.CharField(choices=[('pending', 'Waiting for resources'), ('queued', 'Handed to a worker'), ('running', 'Running'), ('succeeded', 'Succeeded'), ('failed', 'Failed'), ('stopped', 'Stopped'), ('lost', 'Lost (host silent)')], db_index=True, default='pending', max_length=16, verbose_name='status')),
                ('lane', models.PositiveSmallIntegerField(choices=[(0, 'Deployments'), (1, 'Training'), (2, 'Exports (CPU)')], default=1, verbose_name='lane')),
                ('priority', models.PositiveSmallIntegerField(default=5, verbose_name='priority')),
                ('held', models.BooleanField(default=False, verbose_name='on hold')),
                ('gpu_config', models.JSONField(blank=True, default=dict, verbose_name='GPU configuration')),
                ('memory_estimate_gb', models.FloatField(blank=True, null=True, verbose_name='estimated GPU memory (GiB)')),
                ('host', models.CharField(blank=True, help_text='Set when resources are reserved.', max_length=255, verbose_name='host')),
                ('master_port', models.PositiveIntegerField(blank=True, help_text='torchrun rendezvous port, unique per host while active.', null=True, verbose_name='master port')),
                ('runner_instance', models.CharField(blank=True, help_text='Random id of the supervisor that claimed the run.', max_length=32, verbose_name='supervisor')),
                ('runner_pid', models.IntegerField(blank=True, null=True, verbose_name='supervisor pid')),
                ('pid', models.IntegerField(blank=True, null=True, verbose_name='process id')),
                ('process_started', models.FloatField(blank=True, help_text='psutil create_time() of the process', null=True)),
                ('heartbeat_at', models.DateTimeField(blank=True, null=True, verbose_name='heartbeat')),
                ('exit_code', models.IntegerField(blank=True, null=True, verbose_name='exit code')),
                ('error', models.TextField(blank=True, verbose_name='error')),
                ('command', models.JSONField(blank=True, default=list, help_text='The argv as run.', verbose_name='command')),
                ('log_file_path', models.CharField(blank=True, max_length=1000, verbose_name='log file')),
                ('created_at', models.DateTimeField(auto_now_add=True, verbose_name='created')),
                ('queued_at', models.DateTimeField(blank=True, null=True, verbose_name='queued')),
                ('started_at', models.DateTimeField(blank=True, null=True, verbose_name='started')),
                ('finished_at', models.DateTimeField(blank=True, null=True, verbose_name='finished')),
                ('stop_requested_at', models.DateTimeField(blank=True, null=True)),
            ],
            options={
                'ordering': ['-created_at', '-id'],
            },
        ),
        migrations.AddField(
            model_name='run',
            name='owner',
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='runs', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddField(
            model_name='reservation',
            name='run',
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.CASCADE, related_name='reservations', to='gpus.run'),
        ),
        migrations.AddIndex(
            model_name='run',
            index=models.Index(fields=['kind', 'subject_id'], name='gpus_run_kind_53a95f_idx'),
        ),
        migrations.AddIndex(
            model_name='run',
            index=models.Index(fields=['status', 'lane', '-priority', 'created_at'], name='gpus_run_status_34ad3d_idx'),
        ),
    ]
