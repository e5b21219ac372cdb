variable "name" {
  description = "Prefix of every resource name."
  type        = string
}

variable "city" {
  description = "The city (RAM is global: role and policy names carry the city)."
  type        = string
}

variable "region" {
  description = "The city's region, where its copies of the secrets live."
  type        = string
}

variable "secret_names" {
  description = "KMS Secrets Manager secret names of the TLS material, by purpose. Names only: nodes read the values at boot."
  type        = map(string)

  validation {
    condition     = alltrue([for n in values(var.secret_names) : can(regex("^[A-Za-z0-9_/+=.@-]{1,192}$", n))])
    error_message = "A secret name has 1-192 characters: letters, digits and _ / + = . @ -."
  }
}

variable "tags" {
  description = "Tags for every resource that takes tags."
  type        = map(string)
}
