/* labtest.h: what the lab's guest-side test programs share: their main() (command line, case
 * selection, TAP plan, skips, exit status), TAP output, the clock, CPU flags. Each program
 * stays one file plus this header: its cases, and a struct labtest that describes them. */
#ifndef LABTEST_H
#define LABTEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int tapno;

static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One TAP line for a case: ok, not ok with the first failure, or not ok with a setup error.
 * A case that made no check at all passed nothing: it is not ok. */
static inline int tap_result(const char *name, long checks, long bad, long first, const char *what,
                      double secs, const char *setup_error)
{
    tapno++;
    if (setup_error)
        printf("not ok %d - %s: setup failed: %s\n", tapno, name, setup_error);
    else if (checks == 0)
        printf("not ok %d - %s: ran no check\n", tapno, name);
    else if (bad)
        printf("not ok %d - %s: %ld of %ld checks stale or wrong (first at iteration %ld: %s)\n",
               tapno, name, bad, checks, first, what);
    else
        printf("ok %d - %s: %ld checks in %.2f s\n", tapno, name, checks, secs);
    fflush(stdout);
    return setup_error || bad || checks == 0;
}

static inline void tap_skip(const char *name, const char *why)
{
    printf("ok %d - %s # SKIP %s\n", ++tapno, name, why);
}

/* Mark the cases named on the command line (all if none; "remap" matches "svm/remap"),
 * print the TAP plan; returns how many, 0 if a name matched nothing. */
static inline int select_cases(int argc, char **argv, int first_arg, const char *const *names, int n,
                        int *selected)
{
    int nsel = 0;
    for (int c = 0; c < n; c++) {
        const char *slash = strchr(names[c], '/');
        selected[c] = first_arg >= argc;
        for (int a = first_arg; a < argc; a++)
            if (!strcmp(argv[a], names[c]) || (slash && !strcmp(argv[a], slash + 1)))
                selected[c] = 1;
        nsel += selected[c];
    }
    if (nsel)
        printf("1..%d\n", nsel);
    return nsel;
}

/* Whether /proc/cpuinfo's first flags line has this flag. */
static inline int cpu_has(const char *flag)
{
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[8192];
    int found = 0;
    size_t n = strlen(flag);
    while (f && fgets(line, sizeof line, f)) {
        if (strncmp(line, "flags", 5) != 0)
            continue;
        for (char *p = strstr(line, flag); p; p = strstr(p + 1, flag))
            if (p[-1] == ' ' && (p[n] == ' ' || p[n] == '\n'))
                found = 1;
        break;
    }
    if (f)
        fclose(f);
    return found;
}

/* What a program tells labtest_main about itself. */
struct labtest {
    const char *prog;
    int ncases;
    const char *(*name)(int c);
    long *iterations, min_iter, max_iter; /* -n ITERATIONS, within [min, max] */
    char flag;                            /* one optional switch (0: none), sets *flag_set */
    int *flag_set;
    /* Why no case can run on this machine (each selected one is skipped with it), or NULL.
     * A fatal error prints "Bail out! ..." itself and returns LABTEST_BAIL. */
    const char *(*prepare)(void);
    const char *(*skip)(int c); /* why case c cannot run here (skipped), or NULL; may be NULL */
    int (*run)(int c);          /* run case c: nonzero when it failed */
};
#define LABTEST_BAIL ((const char *)-1)

/* The programs' main: [-n ITERATIONS] [-FLAG] [CASE...]; TAP on stdout; exit 0 when every
 * selected case passed or was skipped, 1 when one failed, 2 for bad usage or a bail-out. */
static inline int labtest_main(int argc, char **argv, const struct labtest *t)
{
    char opts[8] = "n:", flag[3] = "";
    if (t->flag) {
        opts[2] = t->flag;
        snprintf(flag, sizeof flag, "-%c", t->flag);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    int opt;
    while ((opt = getopt(argc, argv, opts)) != -1) {
        if (opt == 'n') {
            *t->iterations = atol(optarg);
        } else if (t->flag && opt == t->flag) {
            *t->flag_set = 1;
        } else {
            fprintf(stderr, "usage: %s [-n ITERATIONS]%s%s%s [CASE...]\n", argv[0],
                    t->flag ? " [" : "", flag, t->flag ? "]" : "");
            return 2;
        }
    }
    if (*t->iterations < t->min_iter || *t->iterations > t->max_iter) {
        fprintf(stderr, "-n: expected %ld to %ld\n", t->min_iter, t->max_iter);
        return 2;
    }
    const char *names[t->ncases];
    int selected[t->ncases];
    for (int c = 0; c < t->ncases; c++)
        names[c] = t->name(c);
    int nsel = select_cases(argc, argv, optind, names, t->ncases, selected);
    if (!nsel) {
        fprintf(stderr, "no such case\n");
        return 2;
    }
    const char *why = t->prepare();
    if (why == LABTEST_BAIL)
        return 2;
    double t0 = now();
    int failed = 0;
    for (int c = 0; c < t->ncases; c++) {
        if (!selected[c])
            continue;
        const char *skip = why ? why : t->skip ? t->skip(c) : NULL;
        if (skip)
            tap_skip(names[c], skip);
        else
            failed += t->run(c) != 0;
    }
    printf("# %s: %d cases, %ld iterations each, %.2f s\n", t->prog, nsel, *t->iterations,
           now() - t0);
    return failed ? 1 : 0;
}

#endif
