# pROC reference values for tests/evals (see proc_reference.py, which writes the input and reads
# the output). Usage:
#   Rscript proc_reference.R cases.csv results.csv   # AUROC, DeLong CI and tests per case
#   Rscript proc_reference.R --asah asah.csv         # pROC's aSAH data set as numbers
# cases.csv columns: case, level, dir_a, dir_b, label_a, score_a, label_b, score_b
# (score_b may be NA for a case with one score; dir_* is "<", ">" or "auto").
suppressPackageStartupMessages(library(pROC))
args <- commandArgs(trailingOnly = TRUE)

if (args[1] == "--asah") {
  data(aSAH, package = "pROC")
  out <- data.frame(outcome = as.integer(aSAH$outcome == "Poor"), s100b = aSAH$s100b,
                    ndka = aSAH$ndka, wfns = as.numeric(aSAH$wfns))
  write.csv(out, args[2], row.names = FALSE)
  quit(status = 0)
}

cases <- read.csv(args[1], stringsAsFactors = FALSE, colClasses = c(case = "character"))
one_roc <- function(labels, scores, direction) {
  roc(labels, scores, levels = c(0, 1), direction = direction, quiet = TRUE)
}
rows <- list()
for (name in unique(cases$case)) {
  d <- cases[cases$case == name, ]
  level <- d$level[1]
  ra <- one_roc(d$label_a, d$score_a, d$dir_a[1])
  ca <- as.numeric(ci.auc(ra, method = "delong", conf.level = level))
  row <- data.frame(case = name, auc_a = as.numeric(ra$auc), lower_a = ca[1], upper_a = ca[3],
                    direction_a = ra$direction, auc_b = NA, lower_b = NA, upper_b = NA,
                    direction_b = NA, p_paired = NA, p_unpaired = NA, t_unpaired = NA,
                    df_unpaired = NA, p_auto = NA, auto_method = NA)
  if (!all(is.na(d$score_b))) {
    rb <- one_roc(d$label_b, d$score_b, d$dir_b[1])
    cb <- as.numeric(ci.auc(rb, method = "delong", conf.level = level))
    row$auc_b <- as.numeric(rb$auc); row$lower_b <- cb[1]; row$upper_b <- cb[3]
    row$direction_b <- rb$direction
    if (identical(d$label_a, d$label_b)) {
      row$p_paired <- suppressWarnings(roc.test(ra, rb, method = "delong", paired = TRUE))$p.value
    }
    u <- suppressWarnings(roc.test(ra, rb, method = "delong", paired = FALSE))
    row$p_unpaired <- u$p.value; row$t_unpaired <- u$statistic; row$df_unpaired <- u$parameter
    # what roc.test does when `paired` is left to pROC: paired only if the response vectors are
    # identical element by element
    a <- suppressWarnings(roc.test(ra, rb, method = "delong"))
    row$p_auto <- a$p.value; row$auto_method <- a$method
  }
  rows[[length(rows) + 1]] <- row
}
out <- do.call(rbind, rows)
num <- sapply(out, is.numeric)
out[num] <- lapply(out[num], function(x) sprintf("%.17g", x))
write.csv(out, args[2], row.names = FALSE)
