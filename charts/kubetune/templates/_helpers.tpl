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
