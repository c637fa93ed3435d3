{{/* Names and labels. */}}
{{- define "edgelog.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "edgelog.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "edgelog.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "edgelog.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "loader"). */}}
{{- define "edgelog.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgelog.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "edgelog.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "edgelog.secretName" -}}
{{- default (printf "%s-secrets" (include "edgelog.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/*
A value as the text the settings loader reads. Numbers in values files arrive as float64, whose
default text for large integers is 1.34217728e+08, which no integer setting accepts.
*/}}
{{- define "edgelog.scalar" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/*
One EDGELOG_<PREFIX>__<KEY> env entry per key of a map, in key order:
(dict "prefix" "EDGELOG_LOADER" "map" .Values.loader.config "what" "loader.config").
Nested maps are refused: the stages' sections are flat, librdkafka options have their own maps.
*/}}
{{- define "edgelog.mapEnv" -}}
{{- $prefix := .prefix -}}
{{- range $key := keys .map | sortAlpha }}
{{- $value := index $.map $key }}
{{- if kindIs "map" $value }}
{{- fail (printf "%s.%s: a map; settings are one level deep (librdkafka options go in kafkaOptions)" $.what $key) }}
{{- end }}
- name: {{ printf "%s__%s" $prefix ($key | upper) }}
  value: {{ include "edgelog.scalar" $value | quote }}
{{- end }}
{{- end -}}

{{/*
librdkafka options as env entries. Environment variable names cannot hold dots: the settings
loader reads "_" as "." in these keys (shared/config.rs, KafkaOptions::normalised).
*/}}
{{- define "edgelog.kafkaOptionsEnv" -}}
{{- $prefix := .prefix -}}
{{- range $key := keys .map | sortAlpha }}
{{- if regexMatch "(?i)password|secret" $key }}
{{- fail (printf "%s.%s looks secret: put it in a Secret (secrets.kafkaSaslPassword or an extraEnv secretKeyRef)" $.what $key) }}
{{- end }}
- name: {{ printf "%s__%s" $prefix ($key | replace "." "_" | upper) }}
  value: {{ include "edgelog.scalar" (index $.map $key) | quote }}
{{- end }}
{{- end -}}

{{/*
The environment every edgelog container shares: config, librdkafka options, the Kafka SASL
password. `.admin` adds the ClickHouse admin password (setup, verify); `.loader` the loader's.
(dict "ctx" $ "admin" true "loader" false)
*/}}
{{- define "edgelog.commonEnv" -}}
{{- $v := .ctx.Values -}}
{{- range $section := keys $v.config | sortAlpha }}
{{- include "edgelog.mapEnv" (dict "prefix" (printf "EDGELOG_%s" ($section | upper)) "map" (index $v.config $section) "what" (printf "config.%s" $section)) }}
{{- end }}
{{- include "edgelog.kafkaOptionsEnv" (dict "prefix" "EDGELOG_KAFKA__OPTIONS" "map" $v.kafkaOptions "what" "kafkaOptions") }}
{{- $secret := include "edgelog.secretName" .ctx }}
- name: EDGELOG_KAFKA__OPTIONS__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $v.secrets.keys.kafkaSaslPassword }}
      optional: true
{{- if .loader }}
- name: EDGELOG_CLICKHOUSE__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $v.secrets.keys.clickhousePassword }}
{{- end }}
{{- if .admin }}
- name: EDGELOG_CLICKHOUSE__ADMIN_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $v.secrets.keys.clickhouseAdminPassword }}
      optional: true
{{- end }}
{{- end -}}

{{/* The pod-level settings every pod of the chart shares. */}}
{{- define "edgelog.podSpecCommon" -}}
# Service links add <SERVICE>_PORT-style variables for every Service in the namespace that has
# a cluster IP; one named edgelog-… (say an edgelog-ch-proxy) gives EDGELOG_CH_PROXY_PORT, which
# the settings loader would take for a configuration key and refuse to start.
enableServiceLinks: false
# No edgelog binary talks to the Kubernetes API.
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container-level settings: (dict "ctx" $). */}}
{{- define "edgelog.containerCommon" -}}
image: {{ include "edgelog.image" .ctx }}
imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
securityContext:
  {{- toYaml .ctx.Values.containerSecurityContext | nindent 2 }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
{{- end -}}

{{/*
A scheduled operator command whose failed Job is the alert (verify, status). One attempt, kept for
its log: what it reports is not transient within one run.
Args: ctx (root), component (name suffix), command (list), values (its section of values.yaml).
*/}}
{{- define "edgelog.cronJob" -}}
{{- $ := .ctx -}}
apiVersion: batch/v1
kind: CronJob
metadata:
  name: {{ include "edgelog.fullname" $ }}-{{ .component }}
  labels:
    {{- include "edgelog.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  schedule: {{ .values.schedule | quote }}
  concurrencyPolicy: Forbid
  successfulJobsHistoryLimit: 3
  failedJobsHistoryLimit: 3
  jobTemplate:
    spec:
      backoffLimit: 0
      activeDeadlineSeconds: {{ .values.activeDeadlineSeconds }}
      template:
        metadata:
          labels:
            {{- include "edgelog.selectorLabels" (dict "ctx" $ "component" .component) | nindent 12 }}
        spec:
          {{- include "edgelog.podSpecCommon" $ | nindent 10 }}
          restartPolicy: Never
          containers:
            - name: {{ .component }}
              {{- include "edgelog.containerCommon" (dict "ctx" $) | nindent 14 }}
              command: {{ toJson .command }}
              {{- with .values.args }}
              args:
                {{- toYaml . | nindent 16 }}
              {{- end }}
              env:
                {{- include "edgelog.commonEnv" (dict "ctx" $ "admin" true "loader" false) | trim | nindent 16 }}
              resources:
                {{- toYaml .values.resources | nindent 16 }}
          volumes:
            - name: tmp
              emptyDir:
                sizeLimit: 64Mi
{{- end }}
