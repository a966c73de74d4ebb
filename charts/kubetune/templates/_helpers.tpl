{{- define "kubetune.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- /* The operator image: repository:tag, the tag defaulting to the chart's appVersion. */ -}}
{{- define "kubetune.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (.Values.operator.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- /* The default trainer image: a reference without a tag or digest gets the chart's appVersion. */ -}}
{{- define "kubetune.trainerImage" -}}
{{- $ref := .Values.trainer.image -}}
{{- if regexMatch "@|:[^/]+$" $ref -}}
{{- $ref -}}
{{- else -}}
{{- printf "%s:%s" $ref .Chart.AppVersion -}}
{{- end -}}
{{- end -}}

{{- /* The operator's metrics Service; a ServiceMonitor names its targets' `job` after it. */ -}}
{{- define "kubetune.metricsService" -}}
{{- printf "%s-metrics" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- /* Labels of a prometheus-operator object: the chart's, and the additionalLabels given as `extra` (which win). */ -}}
{{- define "kubetune.monitoringLabels" -}}
{{- toYaml (mustMergeOverwrite (fromYaml (include "kubetune.labels" .root)) (.extra | default dict)) -}}
{{- end -}}

{{- /* An alert's labels: severity, prometheusRule.alertLabels, and `namespace` when given. */ -}}
{{- define "kubetune.alertLabels" -}}
{{- $labels := dict "severity" .severity -}}
{{- with .namespace }}{{ $_ := set $labels "namespace" . }}{{ end -}}
{{- toYaml (mustMergeOverwrite (deepCopy (.rule.alertLabels | default dict)) $labels) -}}
{{- end -}}

{{- /* runbook_url: <prometheusRule.runbookUrl>#<alertname in lower case>, when a base URL is set. */ -}}
{{- define "kubetune.runbookUrl" -}}
{{- with .rule.runbookUrl -}}
runbook_url: {{ printf "%s#%s" (trimSuffix "/" .) (lower $.alert) | quote }}
{{- end -}}
{{- end -}}
